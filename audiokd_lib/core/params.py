"""One parameter file per profile (params/<profile>.yaml), read and checked in one place.

Every notebook and command reads its settings through :func:`load_params`. The schema below is the
single list of what a profile may say; a key it does not know (a typo) or a value it does not accept
(an unknown dataset name) stops everything at once with the key named, before minutes of work are
spent on the wrong settings. pydantic does the checking because its errors carry the exact path of
the offending key.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from audiokd_lib.core.files import project_root


class ParamsError(ValueError):
    """A parameter file that cannot be used, with the file and key named."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NotesParams(_Section):
    """Single rendered notes, the TinySOL-like classification task."""

    instruments: list[str] | Literal["all"] = "all"  # TinySOL abbreviations, e.g. [Fl, Vn, TpC]
    dynamics: list[Literal["pp", "mf", "ff"]] = ["pp", "mf", "ff"]
    pitch_step: int = Field(1, ge=1, description="semitones between rendered pitches")
    seconds: float = Field(2.0, ge=0.5, le=10.0)
    val_fraction: float = Field(0.15, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.15, ge=0.0, lt=0.5)


class PiecesParams(_Section):
    """Procedural multi-instrument pieces with exact stems, the Slakh/MUSDB-like task."""

    count: int = Field(200, ge=0, description="pieces rendered with the training soundfonts")
    heldout_count: int = Field(40, ge=0, description="pieces rendered with the held-out soundfont")
    seconds: float = Field(10.0, ge=2.0, le=60.0)
    sample_rate: int = Field(22050, ge=8000)
    val_fraction: float = Field(0.1, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.1, ge=0.0, lt=0.5)


class SubsetParams(_Section):
    """Which part of a real dataset to download: classes, clips per class, longest clip."""

    classes: list[str] | Literal["all"] = "all"  # the dataset's own class names or codes
    files_per_class: int | None = Field(None, ge=1, description="null: every clip of each class")
    max_seconds: float | None = Field(None, gt=0.0, description="longer clips are left out; null: no limit")


class IrmasSubsetParams(SubsetParams):
    testing_files: int = Field(50, ge=0, description="multi-label testing excerpts, besides the training clips")


class DownloadParams(_Section):
    """Real datasets: where they are cached, how many bytes may be fetched, and which subsets."""

    cache_dir: str | None = None  # null: $AUDIOKD_CACHE/datasets, else ~/.cache/audiokd/datasets
    budget_bytes: int = Field(1_000_000_000, ge=0, description="all downloads into the cache together")
    base_url: str | None = None  # a mirror with the official paths (tests: a loopback server)
    tinysol: SubsetParams = SubsetParams()
    irmas: IrmasSubsetParams = IrmasSubsetParams(files_per_class=50)
    openmic: SubsetParams = SubsetParams(files_per_class=25)
    esc50: SubsetParams = SubsetParams(files_per_class=10)


class RealEvalParams(_Section):
    """The real recordings of the `real` column (audiokd_lib/data/real_eval.csv): reported on, never trained on."""

    enabled: bool = True
    dir: str | None = None   # a folder with audio/<file> for each recording, searched before $AUDIOKD_REAL_EVAL
    download: bool = True    # fetch what is missing from the listed public URLs into the cache


class DataParams(_Section):
    # The clips notebooks 02-07 learn from: the rendered notes, or a real dataset downloaded by notebook 01.
    dataset: Literal["rendered_notes", "tinysol", "irmas", "openmic", "esc50"] = "rendered_notes"
    sample_rate: int = Field(32000, ge=8000, description="rendering rate of the single notes")
    synth: Literal["auto", "fluidsynth", "tinysoundfont"] = "auto"
    train_soundfonts: list[str] = ["FluidR3_GM"]
    heldout_soundfont: str | None = "MuseScore_General"
    # The transfer set: notes played by these soundfonts, at training pitches only, that no model ever sees
    # with their labels. Only the teacher labels them, so distillation can use them and the labels-only
    # baseline cannot (Hinton et al., 2015). Never the held-out soundfont.
    transfer_soundfonts: list[str] = []
    # Without the Debian soundfonts, render with TimGM6mb (shipped in pretty_midi) instead of
    # failing; the substitution is printed and recorded in the data manifest.
    allow_fallback_soundfont: bool = True
    notes: NotesParams = NotesParams()
    pieces: PiecesParams = PiecesParams()
    downloads: DownloadParams = DownloadParams()
    real_eval: RealEvalParams = RealEvalParams()

    @model_validator(mode="after")
    def _check_transfer(self) -> DataParams:
        if self.heldout_soundfont in self.transfer_soundfonts:
            raise ValueError(f"data.transfer_soundfonts holds the held-out soundfont {self.heldout_soundfont}: "
                             "the transfer set must never touch the timbres the models are tested on")
        if overlap := set(self.transfer_soundfonts) & set(self.train_soundfonts):
            raise ValueError(f"data.transfer_soundfonts {sorted(overlap)} are training soundfonts too; a transfer "
                             "set is made of timbres the labelled training clips do not have")
        return self


class FeatureParams(_Section):
    """Log-mel front end shared by every student."""

    sample_rate: int = Field(32000, ge=8000)
    clip_seconds: float = Field(2.0, gt=0.0, description="every clip is cut or padded to this")
    n_fft: int = 1024
    win_length: int = 800
    hop_length: int = 320
    n_mels: int = 128
    f_min: float = 0.0
    f_max: float = 15000.0
    mel_scale: Literal["kaldi", "htk"] = "kaldi"  # kaldi: the filter bank the EfficientAT teacher knows
    preemphasis: float = Field(0.97, ge=0.0, lt=1.0, description="0 turns it off")

    @model_validator(mode="after")
    def _check(self) -> FeatureParams:
        if self.win_length > self.n_fft:
            raise ValueError(f"win_length ({self.win_length}) must not exceed n_fft ({self.n_fft})")
        if self.f_max > self.sample_rate / 2:
            raise ValueError(f"f_max ({self.f_max}) is above Nyquist ({self.sample_rate / 2})")
        return self


class SpecAugmentParams(_Section):
    freq_mask: int = Field(16, ge=0, description="widest frequency mask, in mel bins")
    time_mask: int = Field(40, ge=0, description="widest time mask, in frames")
    n_masks: int = Field(2, ge=0, description="masks of each kind per example")


class MixupParams(_Section):
    alpha: float = Field(0.3, gt=0.0, description="Beta(alpha, alpha) mixing weights")
    p: float = Field(0.5, ge=0.0, le=1.0)


def _ordered(section: _Section, *pairs: tuple[str, str]) -> None:
    for low, high in pairs:
        if getattr(section, low) > getattr(section, high):
            raise ValueError(f"{low} ({getattr(section, low)}) must not exceed {high} ({getattr(section, high)})")


class GainNoiseParams(_Section):
    min_gain_db: float = -12.0
    max_gain_db: float = 6.0
    gain_p: float = Field(0.5, ge=0.0, le=1.0)
    min_snr_db: float = 10.0
    max_snr_db: float = 40.0
    noise_p: float = Field(0.3, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> GainNoiseParams:
        _ordered(self, ("min_gain_db", "max_gain_db"), ("min_snr_db", "max_snr_db"))
        return self


class RirParams(_Section):
    min_rt60: float = Field(0.2, gt=0.0, description="seconds for the reverb tail to fall 60 dB")
    max_rt60: float = Field(0.8, gt=0.0)
    p: float = Field(0.3, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> RirParams:
        _ordered(self, ("min_rt60", "max_rt60"))
        return self


class EqParams(_Section):
    """A random equaliser on the log-mels: a tilt and a few bell curves, as another microphone or room colours."""

    max_db: float = Field(9.0, ge=0.0, description="largest boost or cut, dB")
    bumps: int = Field(3, ge=0, description="bell curves per example, besides the tilt")
    p: float = Field(0.5, ge=0.0, le=1.0)


class CodecParams(_Section):
    formats: list[Literal["mp3", "opus"]] = Field(["mp3", "opus"], min_length=1)
    min_kbps: int = Field(32, ge=6, description="MP3 cannot go below 32 kb/s at 32 kHz and above")
    max_kbps: int = Field(64, ge=6)
    p: float = Field(0.2, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _check(self) -> CodecParams:
        _ordered(self, ("min_kbps", "max_kbps"))
        return self


class AugmentParams(_Section):
    specaugment: SpecAugmentParams = SpecAugmentParams()
    mixup: MixupParams = MixupParams()
    gain_noise: GainNoiseParams = GainNoiseParams()
    rir: RirParams = RirParams()         # notebook 02's waveform reverb, and training's `reverb` on log-mels
    eq: EqParams = EqParams()            # training's `eq` on log-mels
    codec: CodecParams = CodecParams()


class TrainParams(_Section):
    """One training recipe: the baseline and distilled students share it, so only the loss differs."""

    epochs: int = Field(12, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(3e-3, gt=0.0, description="peak learning rate of AdamW")
    weight_decay: float = Field(0.01, ge=0.0)
    warmup_epochs: float = Field(1.0, ge=0.0, description="linear warm-up, then cosine decay to zero")
    patience: int = Field(4, ge=1, description="epochs without a better validation score before stopping")
    crop_seconds: float | None = Field(1.0, gt=0.0, description="random crop per example; None: whole clips")
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    seeds: list[int] = Field([0], min_length=1, description="one run per seed; spread is reported")
    # eq and reverb: a random equaliser and room (augment.eq, augment.rir) applied to the log-mels
    augment: list[Literal["gain", "noise", "specaugment", "mixup", "eq", "reverb"]] = [
        "gain", "noise", "specaugment", "mixup"]
    # After training, BatchNorm statistics measured again on this many batches of whole, clean training
    # clips: the running averages collected during training describe augmented crops, not what the model
    # is tested on. 0: keep the training-time statistics.
    recalibrate_batches: int = Field(40, ge=0)


class TeacherParams(_Section):
    """The large pretrained model whose knowledge the students receive."""

    kind: Literal["efficientat", "ast"] = "efficientat"
    # efficientat: a weights name (mn04_as); ast: a Hugging Face hub id or a local folder
    checkpoint: str = "mn04_as"
    weights_dir: str | None = None  # searched before $AUDIOKD_WEIGHTS and the download cache
    download: bool = True           # fetch from the official URL (sha256-checked) when not found locally
    finetune: Literal["head", "last_blocks", "all"] = "all"
    last_blocks: int = Field(2, ge=1, description="blocks trained when finetune is last_blocks")
    # One fine-tuned teacher per seed; two or more are averaged into one ensemble teacher (notebook 03).
    train: TrainParams = TrainParams(epochs=6, lr=1e-3, seeds=[0])

    @model_validator(mode="after")
    def _check_members(self) -> TeacherParams:
        seeds = self.train.seeds
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"teacher.train.seeds {seeds} repeats a seed: two ensemble members would be one model")
        if self.kind == "ast" and len(seeds) > 1:
            raise ValueError(f"teacher.train.seeds {seeds}: an ensemble needs members that read the students' "
                             "log-mel features, and AST has its own front end; give the AST teacher one seed")
        return self


class StudentParams(_Section):
    """The small network trained from scratch, with and without a teacher."""

    arch: Literal["mobilenet_v3_small", "mobilenet_v3_large", "mobilenet_v2"] = "mobilenet_v3_small"
    width_mult: float = Field(0.5, gt=0.0, le=2.0)
    bn_momentum: float = Field(0.1, gt=0.0, lt=1.0, description="torchvision's 0.01 is too slow for short runs")


class KDParams(_Section):
    """Hinton distillation: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * hard-label loss."""

    temperature: float = Field(3.0, gt=0.0)
    alpha: float = Field(0.7, ge=0.0, le=1.0)
    modes: list[Literal["cached", "consistent"]] = Field(["cached", "consistent"], min_length=1)


class PruneParams(_Section):
    """Pruning the distilled student (notebook 06) and re-training what was pruned (notebook 07)."""

    source: Literal["student-kd", "student-baseline"] = "student-kd"  # its best run by validation score
    sparsities: list[float] = Field([0.3, 0.5, 0.7, 0.9], min_length=1, description="unstructured sweep")
    channel_ratios: list[float] = Field([0.25, 0.35, 0.5, 0.75], min_length=1, description="structured sweep")
    importance: Literal["l1", "taylor"] = "l1"  # how channels are ranked for removal
    sparsity: float = Field(0.7, gt=0.0, lt=1.0, description="the unstructured setting re-trained in 07")
    channel_ratio: float = Field(0.5, gt=0.0, lt=1.0, description="the structured setting re-trained in 07")
    # Adaptive BatchNorm (EagleEye): after pruning, this many training batches (of prune.train.batch_size)
    # measure every BatchNorm's statistics again; 0 keeps the unpruned network's.
    recalibrate_batches: int = Field(40, ge=0)
    # kd: re-distilled; labels: fine-tuned on labels; scratch: the structured architecture re-initialised
    # and distilled on the same budget, the control of Liu et al. (2019)
    retrain: list[Literal["kd", "labels", "scratch"]] = Field(["kd", "labels", "scratch"], min_length=1)
    train: TrainParams = TrainParams(epochs=16, lr=3e-3, warmup_epochs=0.5, patience=16, seeds=[0])

    @model_validator(mode="after")
    def _check(self) -> PruneParams:
        for name in ("sparsities", "channel_ratios"):
            bad = [v for v in getattr(self, name) if not 0.0 < v < 1.0]
            if bad:
                raise ValueError(f"prune.{name}: every value must lie strictly between 0 and 1, got {bad}")
        return self


class CRNNParams(_Section):
    """The mask CRNN separator trained on the rendered pieces (notebook 08)."""

    n_fft: int = Field(1024, ge=16, description="STFT size; n_fft // 2 must halve len(channels) times")
    hop: int = Field(256, ge=1)
    channels: list[int] = Field([16, 32, 64, 64], min_length=1, description="encoder widths, one per block")
    hidden: int = Field(128, ge=1, description="GRU units per direction")
    epochs: int = Field(30, ge=1)
    time_budget_s: float | None = Field(600.0, gt=0.0, description="training stops after this; null: no limit")
    patience: int = Field(4, ge=1, description="epochs without a lower validation loss before stopping")
    steps_per_epoch: int | None = Field(None, ge=1, description="steps between validations; null: one pass "
                                        "over the training audio")
    batch_size: int = Field(8, ge=1)
    crop_seconds: float = Field(3.0, gt=0.0, description="length of each remixed training example")
    lr: float = Field(1e-3, gt=0.0, description="AdamW learning rate, constant")
    weight_decay: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> CRNNParams:
        if self.hop > self.n_fft:
            raise ValueError(f"hop ({self.hop}) must not exceed n_fft ({self.n_fft})")
        if (self.n_fft // 2) % 2 ** len(self.channels):
            raise ValueError(f"n_fft // 2 ({self.n_fft // 2}) must be divisible by 2 ** len(channels) "
                             f"({2 ** len(self.channels)}): each encoder block halves the frequency axis")
        return self


class SeparationParams(_Section):
    """Separating stems and keeping those of the instruments the classifier hears (notebook 08)."""

    separator: Literal["crnn", "demucs"] = "crnn"
    demucs_name: str = "htdemucs"  # htdemucs: 4 stems; htdemucs_6s adds guitar and piano
    demucs_repo: str | None = None  # a folder of Demucs weights; null: the official download
    segment_seconds: float | None = Field(None, gt=0.0, description="null: the model's own (HTDemucs: 7.8 s)")
    overlap: float = Field(0.25, ge=0.0, lt=1.0, description="share of each segment cross-faded with the next")
    threshold: float = Field(0.5, ge=0.0, le=1.0, description="probability at which an instrument counts as heard")
    eval_pieces: int | None = Field(None, ge=1, description="pieces of each of test and heldout scored by SDR; "
                                    "null: all")
    crnn: CRNNParams = CRNNParams()
    # The multi-label instrument detector: the student, trained on the pieces, distilled from mn04 zero-shot.
    detector: TrainParams = TrainParams(epochs=20, crop_seconds=3.0, seeds=[0])
    # Stems of each training piece added to the detector's training clips as solos (tables.solo_stems); 0: none
    detector_solo_stems: int = Field(0, ge=0)


class BeatPiecesParams(_Section):
    """Procedural pieces with exact beats and downbeats (notebook 09), rendered like 08's pieces."""

    count: int = Field(100, ge=4, description="pieces in the training soundfonts (train, val and test)")
    heldout_count: int = Field(30, ge=0, description="pieces in the held-out soundfont: the unseen test")
    seconds: float = Field(12.0, ge=6.0, description="mir_eval skips each piece's first 5 s")
    sample_rate: int = Field(22050, ge=8000)
    min_bpm: float = Field(60.0, gt=0.0)
    max_bpm: float = Field(180.0, gt=0.0)
    metres: list[Literal["3/4", "4/4", "6/8"]] = Field(["3/4", "4/4", "6/8"], min_length=1)
    drift_fraction: float = Field(0.3, ge=0.0, le=1.0, description="pieces whose tempo wanders (expressive drift)")
    max_drift: float = Field(0.1, ge=0.0, lt=0.5, description="largest tempo swing of a drifting piece, as a ratio")
    drums_fraction: float = Field(0.5, ge=0.0, le=1.0, description="pieces with a drum kit; the rest: pitched only")
    humanise_ms: float = Field(12.0, ge=0.0, description="spread of the onsets around the beat grid")
    val_fraction: float = Field(0.15, ge=0.0, lt=0.5)
    test_fraction: float = Field(0.15, ge=0.0, lt=0.5)

    @model_validator(mode="after")
    def _check(self) -> BeatPiecesParams:
        if self.min_bpm >= self.max_bpm:
            raise ValueError(f"min_bpm ({self.min_bpm}) must be below max_bpm ({self.max_bpm})")
        return self


class BeatTrainParams(_Section):
    epochs: int = Field(40, ge=1, description="an epoch: about four excerpts of every training piece")
    teacher_epochs: int = Field(15, ge=1, description="the teacher's (each of its epochs costs more)")
    batch_size: int = Field(16, ge=1)
    crop_seconds: float = Field(4.0, gt=0.0, description="random excerpt of a piece per example")
    lr: float = Field(3e-3, gt=0.0, description="peak of a one-cycle schedule")
    patience: int = Field(40, ge=1, description="epochs without a better validation score before stopping; "
                          "early on, a flat activation scores well by chance, so the default never stops")


class BeatsParams(_Section):
    """Real-time beat and downbeat tracking, a causal student distilled from a non-causal teacher (09)."""

    pieces: BeatPiecesParams = BeatPiecesParams()
    n_fft: int = Field(1024, ge=64, description="STFT window, ending at the current hop (causal)")
    hop: int = Field(441, ge=1, description="samples between frames: 441 at 22.05 kHz is 20 ms, 50 frames/s")
    n_mels: int = Field(64, ge=8)
    teacher_hidden: int = Field(64, ge=1, description="GRU units per direction of the bidirectional teacher")
    teacher_layers: int = Field(2, ge=1)
    student_hidden: int = Field(32, ge=1, description="GRU units of the causal student")
    train: BeatTrainParams = BeatTrainParams()
    kd_alpha: float = Field(0.5, ge=0.0, le=1.0, description="weight of the teacher's activations in the loss")
    thresholds: list[float] = Field([0.2, 0.3, 0.4, 0.5, 0.6, 0.7], min_length=1)
    # The DBN (a bar-pointer style HMM over beat period and phase, decoded by Viterbi; decode.py)
    dbn_min_bpm: float = Field(55.0, gt=0.0)
    dbn_max_bpm: float = Field(190.0, gt=0.0)
    dbn_transition_lambda: float = Field(100.0, gt=0.0, description="higher: tempo changes less between beats")
    dbn_observation_lambda: int = Field(16, ge=2, description="the first 1/lambda of each beat period is a beat")
    bar_lengths: list[int] = Field([2, 3, 4], min_length=1, description="beats per bar the downbeat HMM considers")
    # Real recordings with annotated beats, only ever tested on (data/candombe.py), fetched under data.downloads
    real_dataset: Literal["none", "candombe"] = "none"
    real_recordings: int = Field(6, ge=1, description="performances of the real dataset (2-4 min each)")


class SearchTrainParams(_Section):
    epochs: int = Field(30, ge=1, description="an epoch: every training piece in about `segments` crops")
    pieces_per_batch: int = Field(16, ge=2, description="pieces a batch (P); each gives `segments` crops")
    segments: int = Field(4, ge=2, description="crops of each piece in a batch (K): the positives")
    lr: float = Field(3e-3, gt=0.0, description="AdamW, peak of a one-cycle schedule")
    weight_decay: float = Field(1e-4, ge=0.0)
    patience: int = Field(8, ge=1, description="epochs without a better validation recall@5 before stopping")


class SearchIndexParams(_Section):
    """The FAISS indexes compared on synthetic vectors (exact against approximate)."""

    sizes: list[int] = Field([1000, 10000, 100000], min_length=1, description="catalogue sizes of the benchmark")
    queries: int = Field(200, ge=1, description="queries timed and scored at each size")
    nlist: int = Field(256, ge=1, description="IVF cells (capped at size / 39: FAISS wants 39 points a cell)")
    nprobe: int = Field(8, ge=1, description="IVF cells visited by a query")
    hnsw_m: int = Field(16, ge=2, description="HNSW links a node")
    ef_search: int = Field(64, ge=1, description="HNSW candidates kept during a search")


class SearchParams(_Section):
    """Audio similarity search: multi-modal segment embeddings, metric learning, FAISS (notebook 10)."""

    segment_seconds: float = Field(6.0, gt=0.0, description="length of a catalogue item")
    segment_hop: float = Field(2.0, gt=0.0, description="seconds between the starts of a piece's segments")
    hop_length: int = Field(512, ge=64, description="samples between feature frames (at beats.pieces' rate)")
    n_fft: int = Field(2048, ge=256)
    n_mels: int = Field(64, ge=8, description="timbre: log-mel bands")
    n_chroma: int = Field(24, ge=12, description="harmony: chroma bins (24: quarter tones)")
    tempo_lags: int = Field(48, ge=8, description="rhythm: onset autocorrelation lags (48 frames: 1.1 s)")
    hpss: bool = Field(False, description="chroma from the harmonic part, onsets from the percussive (0.3 s a piece)")
    embedding_dim: int = Field(64, ge=2)
    width: int = Field(32, ge=4, description="channels of each modality's backbone (the small model)")
    teacher_width: int = Field(128, ge=4, description="the larger model, whose embedding is distilled")
    margin: float = Field(0.2, gt=0.0, description="triplet loss margin (Euclidean, unit vectors)")
    supcon_temperature: float = Field(0.05, gt=0.0, description="supervised contrastive loss: the temperature "
                                      "dividing the similarities (not kd.temperature, Hinton's)")
    kd_alpha: float = Field(0.7, ge=0.0, le=1.0, description="weight of the teacher's embedding in the loss")
    kd_loss: Literal["cosine", "relational"] = Field("relational", description="cosine: each embedding copied; "
                                                     "relational: the batch's similarities copied")
    train: SearchTrainParams = SearchTrainParams()
    optuna_trials: int = Field(4, ge=0, description="Optuna trials over lr and supcon_temperature; 0: no search")
    optuna_epochs: int = Field(8, ge=1, description="epochs of each trial")
    index: SearchIndexParams = SearchIndexParams()
    top: int = Field(10, ge=1, description="results a query returns")
    prf_k: int = Field(3, ge=1, description="pseudo-relevance feedback: top results averaged into the query")
    mmr_lambda: float = Field(0.5, ge=0.0, le=1.0, description="MMR: 1 ranks by relevance alone, 0 by novelty")

    @model_validator(mode="after")
    def _check(self) -> SearchParams:
        if self.segment_hop > self.segment_seconds:
            raise ValueError(f"segment_hop ({self.segment_hop}) must not exceed segment_seconds "
                             f"({self.segment_seconds}): parts of every piece would never be indexed")
        return self


class DistributedParams(_Section):
    # Several processes train one run data-parallel (core/distributed.py), started by torchrun:
    # one per GPU on a GPU machine. 1: a run trains in one process.
    processes: int = Field(1, ge=1, description="processes (GPUs, or CPU cores) that train one run together")


class Params(_Section):
    profile: str
    seed: int = 0
    outputs: str = "outputs/{profile}"  # relative to the project root
    threads: int = Field(1, ge=1, description="torch CPU threads; small models run best on 1")
    # Seeds and variants are independent runs, and on 2 cores one process trained a small student slower
    # on 2 threads than on 1 (docs/measurements.md): N runs go to N processes of one thread each.
    workers: int | None = Field(None, ge=1, description="processes training runs side by side; "
                                "null: one per CPU core on a CPU, one on a GPU")
    distributed: DistributedParams = DistributedParams()
    notebooks: list[str] | Literal["all"] = "all"  # which notebooks `audiokd run` executes
    data: DataParams = DataParams()
    features: FeatureParams = FeatureParams()
    augment: AugmentParams = AugmentParams()
    teacher: TeacherParams = TeacherParams()
    student: StudentParams = StudentParams()
    train: TrainParams = TrainParams()
    kd: KDParams = KDParams()
    prune: PruneParams = PruneParams()
    separation: SeparationParams = SeparationParams()
    beats: BeatsParams = BeatsParams()
    search: SearchParams = SearchParams()

    @property
    def output_dir(self) -> Path:
        """Folder every artefact of this profile is written under."""
        path = Path(self.outputs.format(profile=self.profile))
        return path if path.is_absolute() else project_root() / path

    def fingerprint(self, section: str) -> str:
        """Short hash of one section, to tell artefacts made with other settings apart."""
        blob = json.dumps(getattr(self, section).model_dump(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in chain:
        raise ParamsError(f"{path}: 'extends' loops back to itself ({' -> '.join(map(str, chain))})")
    if not path.is_file():
        raise ParamsError(f"{path}: no such parameter file (profiles live in params/<profile>.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of keys to values at the top level")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    parent_path = Path(parent)
    if not parent_path.suffix:
        parent_path = parent_path.with_suffix(".yaml")
    if not parent_path.is_absolute():
        parent_path = path.parent / parent_path
    return _merge(_read_yaml(parent_path, (*chain, path)), raw)


def _explain(err: dict, path: Path | str) -> str:
    key = ".".join(str(part) for part in err["loc"])
    if err["type"] == "extra_forbidden":
        model: type[BaseModel] = Params
        for part in err["loc"][:-1]:
            annotation = model.model_fields[str(part)].annotation
            model = annotation if isinstance(annotation, type) else model
        close = difflib.get_close_matches(str(err["loc"][-1]), list(model.model_fields), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{path}: unknown key '{key}'{hint}; valid keys here: {', '.join(model.model_fields)}"
    return f"{path}: key '{key}': {err['msg']} (got {err.get('input')!r})"


def profile_params(profile: str, overrides: list[str] | None = None) -> Params:
    """A profile as the CLI's --profile names it: `quick` (params/quick.yaml) or a path to a YAML file;
    `overrides` as :func:`load_params` takes them."""
    return load_params(profile if profile.endswith(".yaml") else Path("params") / f"{profile}.yaml", overrides)


def load_params(path: str | Path, overrides: list[str] | None = None, profile: str | None = None) -> Params:
    """Read a profile's YAML (following `extends:`), apply `overrides`, and check every key and value.

    `overrides` are command-line settings in Hydra's override grammar (`kd.temperature=4`,
    `train.augment=[gain,noise]`), checked by the same schema as the file: a misspelt key fails,
    naming it. `profile` renames the profile (and so its output folder and MLflow experiment).
    """
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = project_root() / path
    raw = _read_yaml(path)
    where = f"{path} with --set {' '.join(overrides)}" if overrides else str(path)
    if overrides:
        raw = apply_overrides(raw, overrides, where)
    raw["profile"] = profile or raw.get("profile") or path.stem
    try:
        return Params(**raw)
    except ValidationError as err:
        raise ParamsError("\n".join(_explain(e, where) for e in err.errors())) from None


def _parse(overrides: list[str], where: str) -> list:
    # Hydra's parser, not a home-made one: quoting, lists, dicts and sweeps (a=1,2) as Hydra users know them.
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as err:
        raise ParamsError(f"{where}: {err}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str], where: str = "--set") -> dict[str, Any]:
    """`raw` (a profile's settings as read) with each `key=value` of `overrides` set; no sweeps here."""
    from omegaconf import OmegaConf

    config = OmegaConf.create(raw)
    for override in _parse(overrides, where):
        if override.is_sweep_override():
            raise ParamsError(f"{where}: {override.input_line} lists several values; `audiokd run` runs one profile "
                              "per value (see expand_sweeps)")
        # force_add: an unknown key is set anyway, so that the schema names it in its error
        OmegaConf.update(config, override.key_or_group, override.value(), merge=False, force_add=True)
    return OmegaConf.to_container(config)


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """One list of single-valued overrides per run: `kd.temperature=1,2 train.epochs=4` gives two runs."""
    choices = [[f"{o.key_or_group}={value}" for value in o.sweep_string_iterator()] if o.is_sweep_override()
               else [o.input_line] for o in _parse(overrides, "--set")]
    return [list(combination) for combination in itertools.product(*choices)]


def write_effective(params: Params, source: str | Path, overrides: list[str]) -> Path:
    """Save the settings a run really used (the profile with its overrides applied) beside its outputs.

    The file, outputs/<profile>/params/<profile>.yaml, is a complete profile: the notebooks read it,
    MLflow stores it with every run, and `audiokd run --params` on it repeats the run.
    """
    from audiokd_lib.core.files import atomic_path

    path = params.output_dir / "params" / f"{params.profile}.yaml"
    header = (f"# The settings of profile {params.profile} as run: {source}"
              + (f" with --set {' '.join(overrides)}" if overrides else "") + "\n")
    with atomic_path(path) as tmp:
        tmp.write_text(header + yaml.safe_dump(params.model_dump(), sort_keys=False))
    return path
