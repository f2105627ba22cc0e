"""Copy a profile's results into the README: the table, the headline and the figures notebook 07 made.

Run by `make readme-results` after `make run`. The README holds the table between the markers
<!-- results:start --> and <!-- results:end -->, so every figure in it comes from one run's files.
"""

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"


def main(profile: str = "quick") -> None:
    outputs, readme = ROOT / "outputs" / profile, ROOT / "README.md"
    parts = [outputs / "results.md", outputs / "headline.md"]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: run `make run PROFILE={profile}` first")
    text = readme.read_text()
    if START not in text or END not in text:
        sys.exit(f"{readme}: no {START} ... {END} block to replace")
    block = "\n\n".join(p.read_text().strip() for p in parts)
    head, rest = text.split(START, 1)
    readme.write_text(f"{head}{START}\n{block}\n{END}{rest.split(END, 1)[1]}")
    target = ROOT / "outputs" / "readme"
    target.mkdir(parents=True, exist_ok=True)
    for figure in ("pareto.png", "sensitivity.png"):
        shutil.copy2(outputs / "figures" / figure, target / figure)
    print(f"README.md: results of outputs/{profile} copied in; figures in {target}")


if __name__ == "__main__":
    main(*sys.argv[1:])
