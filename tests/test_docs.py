"""Every figure the docs quote has its file: each ``bench/results/...`` that README.md,
docs/ and bench/README.md cite is committed, and no committed result records the
directories of the machine that made it."""

import itertools
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CITED = re.compile(r"bench/results/([\w.{},*/-]+)")
MACHINE_DIRECTORY = re.compile(r"(?<![\w.])/(?:tmp|home|root|work|Users|var/folders)/")


def _patterns(cited: str) -> list[str]:
    """``frontier1000.{md,json}`` -> ``["frontier1000.md", "frontier1000.json"]``."""
    parts = re.split(r"\{([^}]*)\}", cited.rstrip(".,;:"))
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def test_every_result_file_the_docs_cite_is_committed():
    missing = []
    for doc in DOCS:
        for match in CITED.finditer(doc.read_text()):
            for pattern in _patterns(match.group(1)):
                # a stem (``frontier1000``) stands for its files (``frontier1000.md``, ...)
                if not any(RESULTS.glob(pattern)) and not any(RESULTS.glob(pattern + ".*")):
                    missing.append(f"{doc.relative_to(ROOT)} cites bench/results/{pattern}")
    assert not missing, "\n".join(missing)


def test_committed_results_name_no_machine_directories():
    found = [f"{path.relative_to(ROOT)}: {MACHINE_DIRECTORY.search(path.read_text()).group(0)}..."
             for path in sorted(RESULTS.rglob("*")) if path.suffix in (".md", ".json")
             and MACHINE_DIRECTORY.search(path.read_text())]
    assert not found, "\n".join(found)


def test_the_pattern_expansion():
    assert _patterns("compare.{md,json,png}") == ["compare.md", "compare.json", "compare.png"]
    assert _patterns("fused_lengths_{cnn,wide}.md.") == ["fused_lengths_cnn.md", "fused_lengths_wide.md"]
