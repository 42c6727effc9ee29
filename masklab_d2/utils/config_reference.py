"""The config-key reference, docs/config_keys.md, generated from masklab_d2/config.py's source.

Every key that ``add_masklab_config`` assigns (``_C.<KEY> = <default>``) is listed with its
default as written and the comment lines directly above it; a ``# ---- Title ----`` comment
starts a section. A default taken from a constructor (``default_of(Class, "argument")``) is read
from that constructor's signature in its module. The sources are parsed, not imported, so neither
torch nor detectron2 is needed::

    python3 -m masklab_d2.utils.config_reference --write   # rewrite docs/config_keys.md
    python3 -m masklab_d2.utils.config_reference --check   # exit 1 when it differs
"""

import argparse
import ast
import os
import re
import sys
from typing import List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_PY = os.path.join(REPO, "masklab_d2", "config.py")
DOC = os.path.join(REPO, "docs", "config_keys.md")

PREAMBLE = """# Config keys

<!-- Generated from masklab_d2/config.py by `python3 -m masklab_d2.utils.config_reference --write`;
edit the comments above the keys there, not this file. -->

`masklab_d2.config.add_masklab_config(cfg)` adds these keys (call it before `merge_from_file`;
`train_net.py` does). Besides them, masklab_d2 registers: the ROI heads `PartialROIHeads`; the
mask heads `MaskLabHead`, `HourglassMaskHead`, `ResNetMaskHead`, `BlendMaskHead`,
`HypercolumnMaskRCNNHead` (a control: the 4-conv head with MaskLab's refinement),
`PartialPointRendMaskHead` (where detectron2.projects.point_rend imports); the box head
`Res5BoxHead`; the backbones `build_masklab_resnet_backbone` and
`build_masklab_resnet_fpn_backbone`; the pooler types `"CropAndResize"` and
`"DeformableCropAndResize"` (`ROI_BOX_HEAD` / `ROI_MASK_HEAD.POOLER_TYPE`); the datasets
`shapes_train`, `shapes_val`, `shapes_test`, `shapes_tiny_train`, `shapes_tiny_val` (cache folder:
`$MASKLAB_SHAPES_DIR`, default `~/.cache/masklab_d2/shapes`); and `train_net.py
--coco-dataset NAME=JSON:IMAGE_ROOT` registers a COCO-format dataset of your own.

PointRend's keys (`MODEL.POINT_HEAD.*`, `MODEL.ROI_MASK_HEAD.FC_DIM` / `NUM_FC` /
`OUTPUT_SIDE_RESOLUTION` / `POINT_HEAD_ON`, ...) come from detectron2's `add_pointrend_config`,
which `add_masklab_config` calls, and are documented in its `config.py`, not in these tables.
"""

SECTION = re.compile(r"^\s*#\s*-{2,}\s*(.*?)\s*-*\s*$")  # "# ---- Title ----"
Key = Tuple[str, str, str]  # (KEY, default as written, meaning)


def _key_name(target: ast.expr) -> Optional[str]:
    """``A.B.C`` for an assignment target ``_C.A.B.C``; None for any other target."""
    parts = []
    while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
    if isinstance(target, ast.Name) and target.id == "_C" and parts:
        return ".".join(reversed(parts))
    return None


def _one_line(code: str) -> str:
    """A default written over several lines, on one (brackets closed up, trailing comma gone)."""
    if "\n" not in code:
        return code
    text = " ".join(line.strip() for line in code.splitlines())
    return re.sub(r",?\s+([\])}])", r"\1", re.sub(r"([\[({])\s+", r"\1", text))


def _cell(text: str, code: bool = False) -> str:
    """Escapes what would break a table row (``|``) and, outside code (``code``), what would read
    as Markdown emphasis or HTML."""
    text = text.replace("|", "\\|")
    return text if code else text.replace("*", "\\*").replace("<", "&lt;")


def _constructor_default(source: str, call: ast.Call) -> Tuple[str, str]:
    """(the default as written, "Class(argument)") of a ``default_of(Class, "argument")`` call,
    read from the signature of ``Class.__init__`` in the module config.py imports it from;
    a tuple default is shown as the list the config holds."""
    name, argument = call.args[0].id, call.args[1].value
    module = next(
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and name in [alias.name for alias in node.names]
    )
    with open(os.path.join(REPO, *module.split(".")) + ".py") as f:
        module_source = f.read()
    (init,) = [
        item
        for node in ast.walk(ast.parse(module_source))
        if isinstance(node, ast.ClassDef) and node.name == name
        for item in node.body
        if isinstance(item, ast.FunctionDef) and item.name == "__init__"
    ]
    positional = init.args.posonlyargs + init.args.args
    pairs = list(zip(positional[len(positional) - len(init.args.defaults) :], init.args.defaults))
    pairs += [(a, d) for a, d in zip(init.args.kwonlyargs, init.args.kw_defaults) if d is not None]
    (default,) = [d for a, d in pairs if a.arg == argument]
    if isinstance(default, ast.Tuple):
        text = "[" + ", ".join(ast.get_source_segment(module_source, e) for e in default.elts) + "]"
    else:
        text = ast.get_source_segment(module_source, default)
    return text, f"{name}({argument})"


def parse(source: str) -> List[Tuple[str, List[Key]]]:
    """The keys ``add_masklab_config`` assigns, by section, in source order.

    Args:
        source: the text of masklab_d2/config.py.

    Returns:
        ``[(section title, [(key, default as written, meaning), ...]), ...]``; keys before the
        first section title come under the title "", and sections without keys are left out.
    """
    function = next(
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef) and node.name == "add_masklab_config"
    )
    starts = {node.lineno: node for node in function.body}
    lines = source.splitlines()
    sections: List[Tuple[str, List[Key]]] = [("", [])]
    comments: List[str] = []
    number = function.body[0].lineno
    while number <= function.body[-1].end_lineno:
        line = lines[number - 1].strip()
        node = starts.get(number)
        if node is not None:
            targets = getattr(node, "targets", [])
            key = _key_name(targets[0]) if isinstance(node, ast.Assign) else None
            value = getattr(node, "value", None)
            is_node = isinstance(value, ast.Call) and getattr(value.func, "id", "") == "CN"
            if key and len(targets) == 1 and not is_node:
                meaning = " ".join(comments)
                if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "default_of":
                    default, owner = _constructor_default(source, value)
                    meaning += f" (The default of {owner}.)"
                else:
                    default = ast.get_source_segment(source, value)
                sections[-1][1].append((key, _one_line(default), meaning))
            comments = []
            number = node.end_lineno
        elif SECTION.match(line):
            sections.append((SECTION.match(line).group(1), []))
            comments = []
        elif line.startswith("#"):
            comments.append(line.lstrip("#").strip())
        else:  # a blank line parts a comment from what follows
            comments = []
        number += 1
    return [(title, keys) for title, keys in sections if keys]


def render(config_py: str = CONFIG_PY) -> str:
    """The Markdown of docs/config_keys.md: the preamble, then a table per section.

    Args:
        config_py: the config module to read (masklab_d2/config.py).

    Returns:
        The document's text.
    """
    with open(config_py) as f:
        sections = parse(f.read())
    out = [PREAMBLE]
    for title, keys in sections:
        out += [f"### {title}" if title else "### Other keys", ""]
        out += ["| key | default | meaning |", "|---|---|---|"]
        out += [f"| `{key}` | `{_cell(d, code=True)}` | {_cell(m)} |" for key, d, m in keys]
        out.append("")
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``--write`` rewrites docs/config_keys.md, ``--check`` returns 1 (with a message) when it
    differs from :func:`render`, and with neither the document is printed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite docs/config_keys.md")
    mode.add_argument("--check", action="store_true", help="exit 1 when it is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        with open(DOC, "w") as f:
            f.write(text)
    elif args.check:
        current = open(DOC).read() if os.path.exists(DOC) else None
        if current != text:
            print(
                f"{os.path.relpath(DOC, REPO)} is out of date with masklab_d2/config.py; run "
                "python3 -m masklab_d2.utils.config_reference --write",
                file=sys.stderr,
            )
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
