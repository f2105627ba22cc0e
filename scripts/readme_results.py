"""Copy a profile's results into the README: the table and the headline notebook 07 made, and its figures.

Run by `make readme-results` after `make run`. The README holds the table and the headline between the
markers <!-- results:start --> and <!-- results:end --> (each exactly once), so every figure in that block
comes from one run's files. The figures are copied to outputs/readme/ (committed), where the README shows
the Pareto figure and docs/pruning.md the sensitivity curves; docs/*.md discuss the numbers and say which
run they come from.
"""

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"
PARTS = ("results.md", "headline.md")  # written by notebook 07 into outputs/<profile>/
FIGURES = ("pareto.png", "sensitivity.png")  # outputs/<profile>/figures/ -> outputs/readme/
SHOWN_IN = {"pareto.png": "README.md", "sensitivity.png": "docs/pruning.md"}


def replace_block(text: str, block: str, where: str = "README.md") -> str:
    """`text` with what lies between the markers replaced by `block`; each marker must be there once."""
    if text.count(START) != 1 or text.count(END) != 1 or text.index(START) > text.index(END):
        sys.exit(f"{where}: needs one {START} followed by one {END}, to replace what lies between them")
    head, rest = text.split(START, 1)
    return f"{head}{START}\n{block.strip()}\n{END}{rest.split(END, 1)[1]}"


def main(profile: str = "quick", root: Path = ROOT) -> None:
    outputs, readme = root / "outputs" / profile, root / "README.md"
    parts = [outputs / name for name in PARTS]
    figures = [outputs / "figures" / name for name in FIGURES]
    missing = [str(p) for p in parts + figures if not p.is_file()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run `make run PROFILE={profile}` first")
    block = "\n\n".join(p.read_text().strip() for p in parts)
    readme.write_text(replace_block(readme.read_text(), block, str(readme)))
    target = root / "outputs" / "readme"
    target.mkdir(parents=True, exist_ok=True)
    for figure in figures:
        shutil.copy2(figure, target / figure.name)
    print(f"README.md: results of outputs/{profile} copied in; figures in {target} "
          f"(shown in {', '.join(sorted(set(SHOWN_IN.values())))})")


if __name__ == "__main__":
    main(*sys.argv[1:])
