"""The documentation stays true: docs/config_keys.md is what masklab_d2/config.py gives, every
relative link resolves, and the README stays short with the blocks .ci/run executes. No
detectron2 (nor torch) needed."""

import glob
import os
import re

import pytest
from helpers import REPO

from masklab_d2.utils import config_reference

DOCS = [os.path.join(REPO, "README.md"), os.path.join(REPO, "projects", "README.md")] + sorted(
    glob.glob(os.path.join(REPO, "docs", "*.md"))
)


def _assigned_keys():
    """The keys add_masklab_config assigns, found by a regex over config.py (independently of
    config_reference's ast walk); ``_C.X = CN()`` creates a node, not a key."""
    source = open(os.path.join(REPO, "masklab_d2", "config.py")).read()
    body = source.split("def add_masklab_config(", 1)[1]
    return re.findall(r"^\s*_C\.([A-Z0-9_.]+)\s*=\s*(?=\S)(?!CN\(\))", body, re.M)


def test_config_keys_doc_is_generated():
    with open(os.path.join(REPO, "docs", "config_keys.md")) as f:
        assert f.read() == config_reference.render(), (
            "docs/config_keys.md differs from masklab_d2/config.py; run "
            "`python3 -m masklab_d2.utils.config_reference --write`"
        )


def test_every_assigned_key_is_in_the_reference():
    keys = _assigned_keys()
    assert len(keys) > 40 and len(set(keys)) == len(keys)
    rendered = config_reference.render()
    rows = re.findall(r"^\| `([A-Z0-9_.]+)` \|", rendered, re.M)
    assert sorted(rows) == sorted(keys)
    missing = [key for key in keys if f"| `{key}` |" not in rendered]
    assert not missing, f"docs/config_keys.md lacks {missing}"


def test_the_generator_reads_sections_comments_and_multiline_defaults():
    source = '''
def add_masklab_config(cfg):
    """Doc."""
    _C = cfg
    # ---- First ----
    # Not a key's comment: a call follows.
    helper(_C)
    # A key.
    _C.MODEL.A = 1

    # ---- Second (with - dashes) ------------
    _C.MODEL.NODE = CN()
    # Two comment
    # lines.
    _C.MODEL.NODE.B = [
        "x",
        "y",
    ]
    _C.MODEL.NODE.C = "a|b"
'''
    assert config_reference.parse(source) == [
        ("First", [("MODEL.A", "1", "A key.")]),
        (
            "Second (with - dashes)",
            [("MODEL.NODE.B", '["x", "y"]', "Two comment lines."), ("MODEL.NODE.C", '"a|b"', "")],
        ),
    ]


def _links(path):
    """Relative link targets ``](target)`` of a Markdown file, outside code blocks and spans."""
    text = re.sub(r"^```.*?^```", "", open(path).read(), flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("doc", DOCS, ids=[os.path.relpath(p, REPO) for p in DOCS])
def test_relative_links_resolve(doc):
    broken = [
        target
        for target in _links(doc)
        if not target.startswith(("http://", "https://", "#", "mailto:"))
        and not os.path.exists(os.path.join(os.path.dirname(doc), target.split("#")[0]))
    ]
    assert not broken, f"{os.path.relpath(doc, REPO)}: links to missing paths {broken}"


def test_readme_is_short_and_keeps_the_ci_blocks():
    with open(os.path.join(REPO, "README.md")) as f:
        text = f.read()
    assert len(text.splitlines()) <= 300, "README.md: move detail into docs/ (at most 300 lines)"
    for step in ("install", "test"):  # the blocks .ci/run finds and runs verbatim
        assert re.search(r"<!-- ci:%s -->\s*```[a-z]*\n(.*?)```" % step, text, re.S), step
