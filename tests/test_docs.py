"""The docs hold together: links resolve, the README stays short and its code parses, the `make` targets it names
exist, every public name is documented, and the run record fields the docs list are the ones the code writes.

Fast (no training; one import of transformers for the run record).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_LIMIT = 12 * 1024

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def _without_code(text: str) -> str:
    """Markdown with fenced blocks and inline code removed (a `[x](y)` inside code is not a link)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _links(page: Path) -> list[str]:
    return LINK.findall(_without_code(page.read_text()))


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text()), re.M):
        anchor = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(anchor)
    return anchors


def test_docs_exist():
    names = {page.name for page in DOCS}
    expected = {"sft.md", "dpo.md", "grpo.md", "ic_ops.md", "policies.md", "fused.md", "multi_gpu.md"}
    expected |= {"checkpoints.md", "tracking.md", "rapidfire_migration.md", "benchmarks.md", "maintainers.md"}
    assert expected <= names, f"missing doc pages: {sorted(expected - names)}"
    assert (ROOT / "docs" / "architecture.png").stat().st_size > 10_000


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for link in _links(page):
        if re.match(r"[a-z]+://|mailto:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        relative = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)
        if not path.exists():
            broken.append(link)
            continue
        if anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link} (no heading for #{anchor} in {relative})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_readme_is_short_and_starts_with_install():
    text = README.read_text()
    assert len(text.encode()) <= README_LIMIT, f"README.md is {len(text.encode())} bytes (limit {README_LIMIT})"
    first_screen = "\n".join(text.splitlines()[:25])
    assert "pip install" in first_screen and "make demo" in first_screen and "make test" in first_screen
    assert "## Drop-in" in text and "docs/dropin.md" in text
    unlinked = [page.name for page in DOCS if f"docs/{page.name}" not in text]
    assert not unlinked, f"README.md links no {unlinked}"


def test_readme_python_blocks_parse():
    blocks = [code for lang, code in FENCE.findall(README.read_text()) if lang == "python"]
    assert blocks, "README.md has no python example"
    for code in blocks:
        ast.parse(code)  # a SyntaxError names the line


def test_make_targets_mentioned_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, re.M))
    mentioned = set(re.findall(r"^make ([a-z][\w-]*)", (ROOT / ".ci" / "run").read_text(), re.M))
    for page in PAGES:  # as a command: in inline code or at the start of a line in a code block
        text = page.read_text()
        mentioned |= set(re.findall(r"`make ([a-z][\w-]*)", text))
        for _, code in FENCE.findall(text):
            mentioned |= set(re.findall(r"^make ([a-z][\w-]*)", code, re.M))
    assert mentioned, "no page mentions a make target"
    assert mentioned <= targets, f"make targets mentioned but not in the Makefile: {sorted(mentioned - targets)}"


def _public_names() -> set[str]:
    """`__all__` of the package and of its public subpackages, read from the source (no heavy import)."""
    names = set()
    for init in (ROOT / "rf_callbacks" / "__init__.py", *sorted((ROOT / "rf_callbacks").glob("*/__init__.py"))):
        for node in ast.parse(init.read_text()).body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                names |= set(ast.literal_eval(node.value))
    return names


def test_every_public_name_is_documented():
    names = _public_names()
    assert {"RFSFTTrainer", "RFDPOTrainer", "RFGRPOTrainer", "Experiment"} <= names
    text = "\n".join(page.read_text() for page in PAGES)
    missing = sorted(name for name in names if not re.search(rf"\b{re.escape(name)}\b", text))
    assert not missing, f"public names no doc page mentions: {missing}"


def test_every_engine_option_is_documented():
    from rf_callbacks.dropin import ENGINE_OPTIONS, PASSIVE_OPTIONS

    sft = (ROOT / "docs" / "sft.md").read_text()
    missing = [name for name in [*ENGINE_OPTIONS, *PASSIVE_OPTIONS] if f"`{name}`" not in sft]
    assert not missing, f"engine options missing from docs/sft.md's argument table: {missing}"


def _documented_run_fields() -> list[str]:
    """The first column of the "Run record fields" table in docs/sft.md."""
    text = (ROOT / "docs" / "sft.md").read_text()
    section = text.split("### Run record fields", 1)[1].split("\n#", 1)[0]
    fields = []
    for row in re.findall(r"^\| (.+?) \|", section, re.M):
        fields += re.findall(r"`(\w+)`", row)
    return fields


def test_run_record_fields_match_the_code(tmp_path):
    """One list of run fields: the table in the docs is what `Run.result()` (results() rows, run.json) returns."""
    from transformers import TrainingArguments

    from rf_callbacks.chunks import DataPlan
    from rf_callbacks.configs import RunSpec
    from rf_callbacks.run import Run

    documented = _documented_run_fields()
    assert "name" in documented and "status" in documented
    spec = RunSpec("a", None, {}, TrainingArguments(output_dir=str(tmp_path), report_to="none"))
    run = Run(spec=spec, plan=DataPlan(num_rows=8, batch_size=2, grad_accum=1, num_chunks=2, max_steps=4), data_key=())
    always = set(run.result())
    optional = {"mean_token_accuracy", "eval_mean_token_accuracy"}  # only once logged
    assert always | optional == set(documented), (
        f"docs/sft.md lists {sorted(set(documented) - always - optional)} that Run.result() does not return, "
        f"and misses {sorted(always - set(documented))}"
    )


def _documented_per_run_fields(page: str) -> set[str]:
    """The field names in the first paragraph of a trainer page's "Per-run fields" section."""
    section = (ROOT / "docs" / page).read_text().split("## Per-run fields\n", 1)[1].strip()
    paragraph = section.split("\n\n", 1)[0]
    return set(re.findall(r"`([a-z][a-z0-9_]*)`", paragraph))


def test_per_run_fields_in_the_docs_are_the_code_lists():
    """One source: each trainer page lists exactly the fields its trainer lets a config set."""
    from rf_callbacks.configs import TRAINING_PER_RUN_FIELDS
    from rf_callbacks.trainers.dpo import DPO_PER_RUN_FIELDS
    from rf_callbacks.trainers.grpo import GRPO_PER_RUN_FIELDS
    from rf_callbacks.trainers.sft import SFT_PER_RUN_FIELDS

    # `warmup_ratio` and `generation_batch_size` are accepted and turned into `warmup_steps` / `steps_per_generation`
    expected = {
        "sft.md": SFT_PER_RUN_FIELDS | {"warmup_ratio"},
        "dpo.md": DPO_PER_RUN_FIELDS - TRAINING_PER_RUN_FIELDS,  # "those of RFSFTTrainer, plus ..."
        "grpo.md": (GRPO_PER_RUN_FIELDS - TRAINING_PER_RUN_FIELDS) | {"generation_batch_size"},
    }
    for page, fields in expected.items():
        documented = _documented_per_run_fields(page)
        assert documented == set(fields), (
            f"docs/{page} lists {sorted(documented - fields)} that the code does not take per run, "
            f"and misses {sorted(fields - documented)}"
        )


def test_every_module_is_in_the_maintainer_layout():
    """The code layout table names every module of the package (a moved or new module updates the page)."""
    layout = (ROOT / "docs" / "maintainers.md").read_text().split("## The path of the data")[0]
    package = ROOT / "rf_callbacks"
    missing = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "__init__.py" or path.parent.name == "data":  # `data/` is one row; packages by their files
            continue
        if f"`{path.name}`" not in layout and f"`{path.relative_to(package).as_posix()}`" not in layout:
            missing.append(path.relative_to(package).as_posix())
    assert not missing, f"modules missing from docs/maintainers.md's code layout: {missing}"


def _package_imports() -> dict[str, set[str]]:
    """Each module of the package -> the package modules it imports, at import time or inside functions."""
    package, graph = ROOT / "rf_callbacks", {}
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = here[: len(here) - node.level + 1]
                graph[name].add(".".join(base + ([node.module] if node.module else [])))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rf_callbacks"):
                graph[name].add(node.module)
    return graph


def test_the_package_has_no_import_cycles():
    """The engine's parts import each other one way only (a cycle would make one part depend on another's inside)."""
    graph = _package_imports()
    assert graph["rf_callbacks.engine"] >= {"rf_callbacks.loop", "rf_callbacks.checkpoint"}  # the walk sees imports
    cycles = []

    def visit(name: str, path: list[str]) -> None:
        for target in sorted(graph.get(name, ())):
            if target == path[0]:
                cycles.append(" -> ".join([*path, target]))
            elif target not in path and target in graph and target > path[0]:  # each cycle once, from its least name
                visit(target, [*path, target])

    for name in sorted(graph):
        visit(name, [name])
    assert not cycles, cycles


@pytest.mark.parametrize(
    ("module", "part", "first_use"),
    [
        ("distributed", "Distributed", "_train_slice"),
        ("checkpoint", "Checkpointer", "_activate"),
        ("applying", "OpApplier", "_fail"),
        ("fused", "FusedRounds", "compute_loss"),
    ],
)
def test_a_part_holding_the_trainer_uses_it_only_through_its_documented_interface(module, part, first_use):
    """`Distributed`, `Checkpointer`, `OpApplier` and `FusedRounds` reach the trainer (`self.trainer` / `trainer`)
    only for the names the maintainer page lists."""
    page = (ROOT / "docs" / "maintainers.md").read_text()
    paragraph = page.split(f"`{part}` holds the trainer and uses it only through this list")[1].split("\n\n")[0]
    documented = set(re.findall(r"`(\w+)`", paragraph))
    tree = ast.parse((ROOT / "rf_callbacks" / f"{module}.py").read_text())
    (cls,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == part]
    used = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.Attribute):
            owner = node.value
            if (isinstance(owner, ast.Name) and owner.id == "trainer") or (
                isinstance(owner, ast.Attribute) and owner.attr == "trainer"
            ):
                used.add(node.attr)
    assert first_use in used  # the walk sees the calls
    assert used == documented, f"used, not listed: {sorted(used - documented)}; listed, unused: {documented - used}"
