"""The repository's shape, checked: imports run one way (nothing imports a layer above its own,
nothing imports in a circle), the concept files import only torch and the standard library, the
root stays small, and the project cites no file it does not hold.

    python -m pytest tests/test_layout.py -q        (under a second)
"""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CONCEPTS = {"lsh_attention", "reversible", "chunked_ff"}
# The layers, bottom up: a module may import its own layer and the ones below, never above.
LAYERS = [
    CONCEPTS,
    {"plot"},
    {"model", "data", "checkpoint"},
    {"translation"},
    {"flags", "train", "sample", "bench"},
    {"experiments"},
]


def layer_of(module):
    top = module.split(".")[0]
    return next(i for i, names in enumerate(LAYERS) if top in names or module in names)


def our_modules():
    """{dotted name: path} of the repository's Python modules outside tests/."""
    paths = [*ROOT.glob("*.py"), *ROOT.glob("translation/*.py"), *ROOT.glob("experiments/*.py")]
    names = {}
    for p in paths:
        rel = p.relative_to(ROOT).with_suffix("")
        names[".".join(rel.parts).removesuffix(".__init__")] = p
    return names


def imports(path, known):
    """The repository modules that path imports, anywhere in the file (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m in known}


def graph():
    known = our_modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def test_every_module_has_a_layer():
    for name in graph():
        layer_of(name)   # StopIteration: a new top-level file; give it a layer above


def test_nothing_imports_upwards():
    wrong = [(a, b) for a, deps in graph().items() for b in deps if layer_of(b) > layer_of(a)]
    assert not wrong, f"imports of a higher layer: {wrong}"


def test_nothing_imports_in_a_circle():
    g, state = graph(), {}

    def visit(node, path):
        if state.get(node) == "open":
            raise AssertionError(f"import cycle: {' -> '.join(path + [node])}")
        if state.get(node) is None:
            state[node] = "open"
            for dep in g[node]:
                visit(dep, path + [node])
            state[node] = "done"

    for node in g:
        visit(node, [])


def test_concept_files_import_only_torch_and_the_standard_library():
    for name in CONCEPTS:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        for node in ast.walk(tree):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                    [node.module] if isinstance(node, ast.ImportFrom) else [])
            for m in mods:
                top = m.split(".")[0]
                assert top == "torch" or top in sys.stdlib_module_names, f"{name}.py imports {m}"


def test_the_root_holds_at_most_twelve_python_files():
    files = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(files) <= 12, files


def tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        pytest.skip("not a git checkout")
    keep = {".py", ".md", ".args", ".txt", ".json", ".ini", ""}
    return [ROOT / f for f in out.stdout.split() if Path(f).suffix in keep
            and (ROOT / f).is_file() and not f.startswith(".")]


BANNED = ["the seed's", "the seed reproduction", "device tool", "this session", "lent this",
          "REFERENCE.md", "METHOD.md"]


def test_the_project_speaks_of_itself():
    """No phrase that names something a reader of the repository cannot see."""
    here = Path(__file__).name
    hits = [(f.relative_to(ROOT).as_posix(), phrase) for f in tracked_text_files()
            if f.name != here for phrase in BANNED
            if phrase.lower() in f.read_text(errors="replace").lower()]
    assert not hits, hits


def test_markdown_links_point_at_files_that_exist():
    missing = []
    for md in [p for p in tracked_text_files() if p.suffix == ".md"]:
        for target in re.findall(r"\]\(([^)#\s]+)\)", md.read_text()):
            if "://" not in target and not (md.parent / target).exists():
                missing.append((md.relative_to(ROOT).as_posix(), target))
    assert not missing, missing
