"""No file a run reads may execute code: an AST scan of every shipped module (issue #14).

Flagged anywhere outside :data:`ALLOWED`: ``pickle``/``dill``/``cloudpickle`` ``load``/``loads``/
``Unpickler``; ``torch.load`` without a literal ``weights_only=True``; ``numpy.load(allow_pickle=True)``;
``yaml.load``/``unsafe_load``/``full_load``; ``shell=True``; ``trust_remote_code=True``; ``eval``/``exec``;
and DCP reads that bypass :mod:`vchitect.train.safe_dcp` (``dcp.load``, ``FileSystemReader``), since
PyTorch's own reader unpickles ``.metadata`` and byte entries with plain pickle.

Tests are not scanned: they craft the payloads that prove the refusals (test_checkpoint_safety.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCANNED = ["vchitect", "data_pipeline", "launch", "benchmarks", "setup.py", "_vchitect_diffusers_hook.py"]

# (file, enclosing class or function) → why the flagged construct is safe there
ALLOWED = {
    ("vchitect/train/safe_dcp.py", "_RestrictedUnpickler"):
        "the allow-list unpickler itself: resolves only DCP metadata classes",
    ("vchitect/train/safe_dcp.py", "SafeFileSystemReader"):
        "subclass of DCP's reader whose read_metadata uses the allow-list unpickler",
    ("vchitect/train/safe_dcp.py", "load"):
        "dcp.load with SafeFileSystemReader and SafeLoadPlanner: the one DCP read path",
    ("data_pipeline/pipeline.py", "_unpack_batch"):
        "in-memory payload between our own Ray tasks (Ray's object store, never written to storage)",
}

PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle"}


def _name(node: ast.AST) -> str:
    """Dotted name of a Name/Attribute chain (``torch.distributed.checkpoint.load``), else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _kw(call: ast.Call, key: str):
    for kw in call.keywords:
        if kw.arg == key:
            return kw.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


class _Scan(ast.NodeVisitor):
    def __init__(self, rel: str):
        self.rel, self.scope, self.found = rel, [], []
        self.dcp_aliases = {"torch.distributed.checkpoint"}
        self.torch_aliases, self.numpy_aliases, self.yaml_aliases = {"torch"}, {"np", "numpy"}, {"yaml"}
        self.imported: dict[str, str] = {}  # local name → module.attr for `from m import a`

    def flag(self, node, what: str) -> None:
        self.found.append((self.rel, self.scope[0] if self.scope else "<module>", node.lineno, what))

    def _scoped(self, node):
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_Import(self, node):
        for a in node.names:
            if a.name == "torch.distributed.checkpoint" and a.asname:
                self.dcp_aliases.add(a.asname)
        self.generic_visit(node)

    def visit_ImportFrom(self, node):
        for a in node.names:
            full = f"{node.module}.{a.name}"
            self.imported[a.asname or a.name] = full
            if full == "torch.distributed.checkpoint":
                self.dcp_aliases.add(a.asname or a.name)
            if node.module in PICKLERS and a.name in {"load", "loads", "Unpickler"}:
                self.flag(node, f"from {node.module} import {a.name}")
            if node.module and node.module.startswith("torch.distributed.checkpoint") and a.name == "FileSystemReader":
                self.flag(node, "import of DCP's FileSystemReader (unpickles .metadata)")
        self.generic_visit(node)

    def visit_Attribute(self, node):
        full = _name(node)
        head, _, attr = full.rpartition(".")
        if head in PICKLERS and attr in {"load", "loads", "Unpickler"}:
            self.flag(node, full)
        if attr == "FileSystemReader":
            self.flag(node, f"{full} (unpickles .metadata)")
        self.generic_visit(node)

    def visit_Call(self, node):
        fn = _name(node.func)
        fn = self.imported.get(fn, fn)
        head, _, attr = fn.rpartition(".")
        if head in self.torch_aliases and attr == "load" and not _is_true(_kw(node, "weights_only")):
            self.flag(node, "torch.load without weights_only=True")
        if head in self.numpy_aliases and attr == "load" and _is_true(_kw(node, "allow_pickle")):
            self.flag(node, "numpy.load(allow_pickle=True)")
        if head in self.yaml_aliases and attr in {"load", "unsafe_load", "full_load", "load_all"}:
            self.flag(node, f"yaml.{attr}")
        if head in self.dcp_aliases and attr == "load":
            self.flag(node, "dcp.load (plain-pickle reader and planner)")
        if fn in {"eval", "exec"}:
            self.flag(node, fn)
        for key in ("shell", "trust_remote_code"):
            if _is_true(_kw(node, key)):
                self.flag(node, f"{key}=True")
        self.generic_visit(node)


def scan_source(source: str, rel: str) -> list[tuple]:
    scan = _Scan(rel)
    scan.visit(ast.parse(source, rel))
    return scan.found


def _files() -> list[Path]:
    out = []
    for entry in SCANNED:
        p = REPO / entry
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return out


def test_no_shipped_module_can_run_code_from_a_file():
    hits = [h for f in _files() for h in scan_source(f.read_text(), str(f.relative_to(REPO)))]
    unexpected = [h for h in hits if (h[0], h[1]) not in ALLOWED]
    assert not unexpected, "\n".join(f"{f}:{line} in {scope}: {what}" for f, scope, line, what in unexpected)
    used = {(h[0], h[1]) for h in hits}
    assert set(ALLOWED) <= used, f"stale allow-list entries: {sorted(set(ALLOWED) - used)}"


@pytest.mark.parametrize("snippet", [
    "import pickle\npickle.loads(b'')",
    "import pickle\npickle.load(open('f', 'rb'))",
    "from pickle import loads\nloads(b'')",
    "import pickle\nclass U(pickle.Unpickler): pass",
    "import dill\ndill.loads(b'')",
    "import torch\ntorch.load('f')",
    "import torch\ntorch.load('f', weights_only=False)",
    "import numpy as np\nnp.load('f', allow_pickle=True)",
    "import yaml\nyaml.load(s, Loader=yaml.Loader)",
    "import subprocess\nsubprocess.run('ls', shell=True)",
    "from transformers import AutoModel\nAutoModel.from_pretrained(p, trust_remote_code=True)",
    "import torch.distributed.checkpoint as dcp\ndcp.load(sd, checkpoint_id=p)",
    "import torch.distributed.checkpoint as dcp\ndcp.FileSystemReader(p).read_metadata()",
    "from torch.distributed.checkpoint import FileSystemReader",
    "eval(text)",
])
def test_the_scan_flags_each_construct(snippet):
    assert scan_source(snippet, "x.py"), snippet


@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.load('f', weights_only=True)",
    "import numpy as np\nnp.load('f', allow_pickle=False)",
    "import yaml\nyaml.safe_load(s)",
    "import subprocess\nsubprocess.run(['ls'])",
    "import torch.distributed.checkpoint as dcp\ndcp.save(sd, checkpoint_id=p)",
])
def test_the_scan_passes_safe_forms(snippet):
    assert scan_source(snippet, "x.py") == [], snippet
