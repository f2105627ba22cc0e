"""From activations to beats and downbeats, and how good they are (mir_eval).

Two ways to turn a beat activation (a probability per frame) into beat times:

- **peak picking** (:func:`pick_peaks`): every local maximum above a threshold, at least
  `min_interval` apart. Fast and causal up to one frame, but each beat is decided alone: a missed
  or doubled peak is a missed or doubled beat, and the result depends on the threshold (swept in 09).
- **a dynamic Bayesian network** (:class:`BeatDBN`), after Krebs, Böck and Widmer's bar-pointer
  model as madmom implements it (DBNBeatTrackingProcessor): hidden states are (beat period,
  position within the beat); the position advances one frame per frame, the period may change only
  at a beat, rarely and a little (`transition_lambda`); the first 1/`observation_lambda` of each
  period is where the activation should be high. Viterbi finds the likeliest path through the whole
  piece: beats regularly spaced, at a tempo that may drift. madmom itself does not install with this
  project's Python and NumPy, so this is a compact, tested re-implementation of that model.

Downbeats (:func:`downbeats`) come from a second, small HMM over the beats found, as madmom's
DBNBarTrackingProcessor does: hidden states are (beats per bar, position in the bar); the position
advances one per beat; position 1 should have a high downbeat activation. Viterbi again.

:func:`evaluate` scores estimates with mir_eval, the reference implementation of the MIREX metrics:
beat F-measure (±70 ms), CMLt and AMLt (continuity at the right metrical level, and at any allowed
one: double or half tempo, off-beat), and the downbeat F-measure. mir_eval ignores each piece's first
5 seconds, as MIREX does.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import mir_eval
import numpy as np

from audiokd_lib.core.params import BeatsParams


def pick_peaks(activation: np.ndarray, threshold: float, fps: float, min_interval: float = 60 / 240) -> np.ndarray:
    """Times (s) of the local maxima (over +-2 frames) at or above `threshold`, at least `min_interval` apart."""
    act = np.asarray(activation, dtype=float)
    padded = np.pad(act, 2, constant_values=-np.inf)
    windows = np.lib.stride_tricks.sliding_window_view(padded, 5)
    candidates = np.flatnonzero((act >= threshold) & (act >= windows.max(axis=1)))
    kept: list[int] = []
    for frame in candidates:
        if not kept or frame - kept[-1] >= min_interval * fps:
            kept.append(int(frame))
        elif act[frame] > act[kept[-1]]:  # two peaks too close: the stronger one stays
            kept[-1] = int(frame)
    return np.asarray(kept, dtype=float) / fps


class BeatDBN:
    """Viterbi decoding of beat times under a (period, phase) HMM; see the module's description."""

    def __init__(self, fps: float, min_bpm: float, max_bpm: float, transition_lambda: float = 100.0,
                 observation_lambda: int = 16):
        self.fps = fps
        self.periods = np.arange(max(2, math.floor(60 * fps / max_bpm)), math.ceil(60 * fps / min_bpm) + 1)
        self.first = np.concatenate([[0], np.cumsum(self.periods)[:-1]])  # flat index of each period's phase 0
        self.last = self.first + self.periods - 1
        self.states = int(self.periods.sum())
        self.phase = np.concatenate([np.arange(p) for p in self.periods])
        self.period_of = np.repeat(np.arange(len(self.periods)), self.periods)
        self.beat_state = self.phase < np.maximum(1, self.periods[self.period_of] / observation_lambda)
        self.observation_lambda = observation_lambda
        ratio = self.periods[None, :] / self.periods[:, None]  # [from, to]
        trans = np.exp(-transition_lambda * np.abs(ratio - 1))
        self.log_trans = np.log(trans / trans.sum(axis=1, keepdims=True))

    def decode(self, activation: np.ndarray) -> np.ndarray:
        """Beat times (s) of the likeliest path for a beat activation (frames,)."""
        act = np.clip(np.asarray(activation, dtype=float), 1e-6, 1 - 1e-6)
        if len(act) == 0:
            return np.zeros(0)
        on, off = np.log(act), np.log((1 - act) / (self.observation_lambda - 1))
        delta = np.where(self.beat_state, on[0], off[0]) - math.log(self.states)
        came_from = np.zeros((len(act), len(self.periods)), dtype=np.int32)  # at phase 0: the period before
        for t in range(1, len(act)):
            entering = delta[self.last][:, None] + self.log_trans  # [from period, to period]
            came_from[t] = entering.argmax(axis=0)
            new = np.empty_like(delta)
            new[1:] = delta[:-1]  # phase advances by one within a period (phase 0 overwritten below)
            new[self.first] = entering.max(axis=0)
            delta = new + np.where(self.beat_state, on[t], off[t])
        state = int(delta.argmax())
        beats = []
        for t in range(len(act) - 1, -1, -1):  # back along the path
            k = self.period_of[state]
            if self.phase[state] == 0:
                beats.append(t)
                if t:
                    state = int(self.last[came_from[t, k]])
            else:
                state -= 1
        return np.asarray(beats[::-1], dtype=float) / self.fps


def dbn_for(bp: BeatsParams, fps: float) -> BeatDBN:
    return BeatDBN(fps, bp.dbn_min_bpm, bp.dbn_max_bpm, bp.dbn_transition_lambda, bp.dbn_observation_lambda)


def downbeats(beats: np.ndarray, activation: np.ndarray, fps: float, bar_lengths: Sequence[int] = (2, 3, 4),
              change: float = 1e-3) -> np.ndarray:
    """The downbeats among `beats` (s): Viterbi over (beats per bar, position) given the downbeat activation.

    Each beat is scored by the activation's maximum within a frame of it; the bar length may change
    at a bar line with probability `change`.
    """
    if len(beats) == 0:
        return np.zeros(0)
    act = np.asarray(activation, dtype=float)
    frames = np.clip(np.round(np.asarray(beats) * fps).astype(int), 0, len(act) - 1)
    score = np.clip([act[max(0, f - 1):f + 2].max() for f in frames], 1e-4, 1 - 1e-4)
    states = [(m, p) for m in bar_lengths for p in range(m)]
    first = np.array([p == 0 for _, p in states])
    trans = np.full((len(states), len(states)), -np.inf)
    for i, (m, p) in enumerate(states):
        for j, (m2, p2) in enumerate(states):
            if m2 == m and p2 == (p + 1) % m:
                trans[i, j] = math.log(1 - change) if p == m - 1 else 0.0
            elif p == m - 1 and p2 == 0 and m2 != m:
                trans[i, j] = math.log(change / (len(bar_lengths) - 1))
    delta = np.where(first, np.log(score[0]), np.log(1 - score[0])) - math.log(len(states))
    back = np.zeros((len(beats), len(states)), dtype=np.int32)
    for k in range(1, len(beats)):
        cand = delta[:, None] + trans
        back[k] = cand.argmax(axis=0)
        delta = cand.max(axis=0) + np.where(first, np.log(score[k]), np.log(1 - score[k]))
    state, path = int(delta.argmax()), []
    for k in range(len(beats) - 1, -1, -1):
        path.append(state)
        state = int(back[k, state])
    path = path[::-1]
    return np.asarray(beats)[[first[s] for s in path]]


def track(activations: np.ndarray, dbn: BeatDBN, bar_lengths: Sequence[int] = (2, 3, 4)
          ) -> tuple[np.ndarray, np.ndarray]:
    """(beat times, downbeat times) from (frames, 2) beat and downbeat probabilities: the DBN, then the bar HMM."""
    beats = dbn.decode(activations[:, 0])
    return beats, downbeats(beats, activations[:, 1], dbn.fps, bar_lengths)


def evaluate_dbn(activations: Sequence[np.ndarray], beats: Sequence[np.ndarray], downbeats: Sequence[np.ndarray],
                 dbn: BeatDBN, bar_lengths: Sequence[int] = (2, 3, 4)) -> dict[str, float]:
    """:func:`evaluate` of what :func:`track` finds in each piece's (frames, 2) activations."""
    tracked = [track(a, dbn, bar_lengths) for a in activations]
    return evaluate([b for b, _ in tracked], beats, [d for _, d in tracked], downbeats)


def evaluate(estimates: Sequence[np.ndarray], references: Sequence[np.ndarray],
             down_estimates: Sequence[np.ndarray] | None = None,
             down_references: Sequence[np.ndarray] | None = None) -> dict[str, float]:
    """Mean mir_eval scores over pieces: F (beat F-measure, 70 ms), CMLt, AMLt, and downbeat F if given."""
    rows = []
    # mir_eval warns when a piece has fewer than two beats (left after the first 5 s): its score is then 0,
    # which is the answer, not a problem to act on.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*beat intervals cannot be computed", category=UserWarning)
        warnings.filterwarnings("ignore", message="(Estimated|Reference) beats are empty", category=UserWarning)
        for k, (est, ref) in enumerate(zip(estimates, references)):
            rows.append(_scores(est, ref, None if down_estimates is None else (down_estimates[k], down_references[k])))
    return {key: float(np.mean([r[key] for r in rows])) for key in rows[0]} if rows else {}


def _scores(est: np.ndarray, ref: np.ndarray, down: tuple[np.ndarray, np.ndarray] | None) -> dict[str, float]:
    ref, est = mir_eval.beat.trim_beats(np.asarray(ref)), mir_eval.beat.trim_beats(np.asarray(est))
    row = {"F": mir_eval.beat.f_measure(ref, est)}
    _, row["CMLt"], _, row["AMLt"] = mir_eval.beat.continuity(ref, est)
    if down is not None:
        row["downbeat F"] = mir_eval.beat.f_measure(mir_eval.beat.trim_beats(np.asarray(down[1])),
                                                    mir_eval.beat.trim_beats(np.asarray(down[0])))
    return row
