"""`python -m hybridgl parse`: the parse a user sees is the one segmentation uses."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hybridgl.cli import main
from hybridgl.parsing import RuleParser

ROOT = Path(__file__).resolve().parents[1]


def test_prints_the_parse_and_the_tree(capsys):
    assert main(["parse", "person far right", "Blue shirt", "--parser", "rules", "--tree"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "'person far right' (parser: rules)"
    assert out[1:6] == ["  sentence     person far right", "  noun phrase  person", "  other nouns  -",
                        "  relation     right", "  direction    right"]
    assert out[6].split() == ["1", "person", "NOUN", "0", "root"]  # the tree, CoNLL-U style heads
    assert out[8].split() == ["3", "right", "NOUN", "1", "nmod"]
    assert out[9] == "'Blue shirt' (parser: rules)"
    assert "  noun phrase  person wearing blue shirt" in out


def test_json_matches_the_library(capsys):
    texts = ["2nd from left", "guy on rigth", "top left donut"]
    assert main(["parse", *texts, "--parser", "rules", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d.pop("expression") for d in lines] == texts
    assert lines == [RuleParser()(t).to_dict() for t in texts]


def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, monkeypatch):
    assert main(["parse", "man", " ", "--parser", "rules"]) == 2
    assert capsys.readouterr().err == "error: empty expression\n"
    monkeypatch.setenv("STANZA_RESOURCES_DIR", str(tmp_path))
    assert main(["parse", "man", "--parser", "stanza"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: stanza's English models are not installed") and err.count("\n") == 1


def test_entry_point():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HYBRIDGL_PARSER": "rules"}
    result = subprocess.run([sys.executable, "-m", "hybridgl", "parse", "far left guy", "--json"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["direction"] == "left"
