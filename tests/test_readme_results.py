"""scripts/readme_results.py: the README's results block from a run's files, and the pages that show its figures."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("readme_results", ROOT / "scripts" / "readme_results.py")
readme_results = importlib.util.module_from_spec(spec)
spec.loader.exec_module(readme_results)
START, END = readme_results.START, readme_results.END


def _run_outputs(root: Path, profile: str = "quick") -> None:
    outputs = root / "outputs" / profile
    (outputs / "figures").mkdir(parents=True)
    (outputs / "results.md").write_text("| role | score |\n|---|---|\n| teacher | 0.9 |\n")
    (outputs / "headline.md").write_text("- Teacher: met.\n")
    for figure in readme_results.FIGURES:
        (outputs / "figures" / figure).write_bytes(figure.encode())


def test_the_block_between_the_markers_is_replaced_and_the_rest_kept(tmp_path, capsys):
    _run_outputs(tmp_path)
    (tmp_path / "README.md").write_text(f"# Title\n\nbefore\n\n{START}\nold table\n{END}\n\nafter\n")
    readme_results.main("quick", tmp_path)
    assert (tmp_path / "README.md").read_text() == (
        f"# Title\n\nbefore\n\n{START}\n| role | score |\n|---|---|\n| teacher | 0.9 |\n\n- Teacher: met.\n{END}"
        "\n\nafter\n")
    for figure in readme_results.FIGURES:
        assert (tmp_path / "outputs" / "readme" / figure).read_bytes() == figure.encode()
    readme_results.main("quick", tmp_path)  # a second copy changes nothing
    assert (tmp_path / "README.md").read_text().count("| teacher | 0.9 |") == 1


@pytest.mark.parametrize("text", ["no markers\n", f"{START}\n{END}\n{START}\n{END}\n", f"{END}\n{START}\n"])
def test_a_readme_without_one_block_is_left_alone(tmp_path, text):
    _run_outputs(tmp_path)
    (tmp_path / "README.md").write_text(text)
    with pytest.raises(SystemExit, match="results:start"):
        readme_results.main("quick", tmp_path)
    assert (tmp_path / "README.md").read_text() == text


def test_missing_run_files_are_named(tmp_path):
    (tmp_path / "README.md").write_text(f"{START}\n{END}\n")
    with pytest.raises(SystemExit, match=r"results\.md.*make run PROFILE=smoke"):
        readme_results.main("smoke", tmp_path)


def test_the_readme_has_one_block_and_the_pages_show_the_copied_figures():
    readme = (ROOT / "README.md").read_text()
    assert readme.count(START) == 1 and readme.count(END) == 1
    for figure, page in readme_results.SHOWN_IN.items():
        prefix = "" if page == "README.md" else "../"
        assert f"]({prefix}outputs/readme/{figure})" in (ROOT / page).read_text(), f"{page} should show {figure}"


def test_the_readme_and_docs_link_to_pages_that_exist():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+\.md)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).resolve().is_file(), f"{page.name} links to a missing {target}"
