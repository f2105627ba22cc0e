"""IRMAS (Zenodo 1290750, CC BY-NC-SA 3.0): predominant-instrument excerpts (training) and multi-label testing excerpts."""

from __future__ import annotations

import contextlib
import zipfile
from pathlib import Path, PurePosixPath

import pandas as pd

from audiokd_lib.core.params import IrmasSubsetParams
from audiokd_lib.data import download
from audiokd_lib.data.sources import (
    HELD_OUT,
    WAV_BYTES_PER_SECOND,
    Downloads,
    Quota,
    archive_check,
    choose_classes,
    hash_bucket,
    hash_order,
    read_manifest,
    save_manifest,
    subset_request,
    up_to_date,
)

IRMAS_CLASSES = {
    "cel": "cello", "cla": "clarinet", "flu": "flute", "gac": "acoustic_guitar", "gel": "electric_guitar",
    "org": "organ", "pia": "piano", "sax": "saxophone", "tru": "trumpet", "vio": "violin", "voi": "voice",
}


def _is_wav(name: str) -> bool:
    """A WAV member, not one of the "._" resource-fork copies macOS zips carry along."""
    return name.endswith(".wav") and not PurePosixPath(name).name.startswith("._")


def _irmas_testing_labels(path: Path) -> list[str]:
    """IRMAS testing labels: one instrument code per line of the .txt beside an excerpt."""
    return [line.strip()[:3] for line in path.read_text().splitlines() if line.strip()[:3] in IRMAS_CLASSES]


def download_irmas(dl: Downloads, subset: IrmasSubsetParams) -> dict:
    """Read IRMAS's zips by range: `files_per_class` training clips per instrument, `testing_files` excerpts.

    Classes are IRMAS's codes (cel, cla, flu, gac, gel, org, pia, sax, tru, vio, voi). A training
    clip's class is its folder; a testing excerpt is kept if one of its labels (the .txt beside it,
    fetched first) is a chosen class.
    """
    root, request = dl.folder("irmas"), subset_request(subset)
    if (manifest := up_to_date(root, request)) is not None:
        return manifest
    spent = dl.ledger.spent
    chosen = choose_classes(subset.classes, IRMAS_CLASSES, "irmas")
    files = dl.files("irmas")
    max_bytes = None if subset.max_seconds is None else 44 + subset.max_seconds * WAV_BYTES_PER_SECOND["irmas"]
    archives: dict[str, dict] = {}
    training = files["IRMAS-TrainingData.zip"]
    with dl.open_zip(training, root) as (zf, raw):
        clips = {info.filename: info for info in zf.infolist() if _is_wav(info.filename)
                 and PurePosixPath(info.filename).parent.name in chosen
                 and (max_bytes is None or info.file_size <= max_bytes)}
        quota = Quota({name: {PurePosixPath(name).parent.name} for name in clips}, subset.files_per_class)
        for name in hash_order(clips):
            if quota.wants(name):
                quota.take(name)
        taken = dl.extract(zf, [clips[name] for name in quota.taken], root, training, raw)
        archives[training.name] = archive_check(training, raw)
    testing, labels = [], []  # excerpts (.wav) and their labels (.txt)
    parts = [remote for name, remote in files.items() if name.startswith("IRMAS-TestingData")]
    if subset.testing_files:
        with contextlib.ExitStack() as stack:
            opened = {remote.name: (remote, *stack.enter_context(dl.open_zip(remote, root))) for remote in parts}
            excerpts = {}  # wav name -> (archive name, wav member, txt member)
            for name, (_, zf, _) in opened.items():
                members = {info.filename: info for info in zf.infolist()}
                for wav, info in members.items():
                    txt = members.get(wav.removesuffix(".wav") + ".txt")
                    if _is_wav(wav) and txt is not None and (max_bytes is None or info.file_size <= max_bytes):
                        excerpts[wav] = (name, info, txt)
            chosen_wavs: dict[str, list[zipfile.ZipInfo]] = {name: [] for name in opened}
            for wav in hash_order(excerpts):
                if len(testing) == subset.testing_files:
                    break
                name, info, txt = excerpts[wav]
                remote, zf, raw = opened[name]
                dl.extract(zf, [txt], root, remote, raw)
                if set(_irmas_testing_labels(root / txt.filename)) & set(chosen):
                    chosen_wavs[name].append(info)
                    testing.append(wav)
                    labels.append(txt.filename)
            dl.ledger.check(sum(download.zip_span(i) for infos in chosen_wavs.values() for i in infos),
                            "the IRMAS testing excerpts")
            for name, infos in chosen_wavs.items():
                remote, zf, raw = opened[name]
                dl.extract(zf, infos, root, remote, raw)
                archives[name] = archive_check(remote, raw)
    return save_manifest(
        root, "irmas", request, chosen, {"clips": taken, "irmas_testing": testing}, {}, archives,
        dl.ledger.spent - spent, [], annotations=labels,
    )


def load_irmas(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The IRMAS subset as two clip tables: training clips (single-label) and testing excerpts (multi-label)."""
    root = Path(root)
    manifest = read_manifest(root, "irmas")
    rows = []
    for rel in manifest["clips"]["clips"]:
        path = PurePosixPath(rel)
        # "[cel][cla]0001__2.wav": excerpt 2 of recording 0001; its excerpts share a split.
        recording = f"{path.parent.name}/{path.stem.rsplit('__', 1)[0]}"
        bucket = hash_bucket(recording)
        split = "test" if bucket < HELD_OUT else "val" if bucket < 2 * HELD_OUT else "train"
        rows.append({"path": str(root / rel), "label": IRMAS_CLASSES[path.parent.name], "instrument": path.parent.name,
                     "recording": recording, "split": split, "source": "irmas"})
    training = pd.DataFrame(rows, columns=["path", "label", "instrument", "recording", "split", "source"])
    chosen = set(manifest["classes"])
    testing = pd.DataFrame(
        [{"path": str(root / rel),
          "labels": "|".join(sorted(IRMAS_CLASSES[c] for c in set(_irmas_testing_labels(
              root / (rel.removesuffix(".wav") + ".txt"))) & chosen)),
          "split": "test", "source": "irmas", "sample_key": PurePosixPath(rel).stem}
         for rel in manifest["clips"]["irmas_testing"]],
        columns=["path", "labels", "split", "source", "sample_key"],
    )
    return training, testing
