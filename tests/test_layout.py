"""The file layout readers rely on: the import graph between project files, the outside libraries
each file may use, and model files that run when copied out of the repository alone."""
import ast
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO

PROJECT = {"data", "training", "runs", "dvae", "enhancer", "generator", "pretrain", "bench", "finetune", "segment",
           "study"}
# project files each file may import (anywhere in the file, functions included)
GRAPH = {
    "data": set(),
    "training": set(),
    "runs": {"training"},  # run bookkeeping around the loop parts
    "enhancer": set(),
    "generator": {"enhancer"},
    "dvae": {"data", "training", "runs"},  # for its own tokenizer-training stage only
    "pretrain": {"data", "training", "runs", "dvae", "generator", "enhancer"},
    "bench": {"pretrain", "training", "runs", "enhancer"},  # times pretrain.py's own step
    "finetune": {"data", "training", "runs", "enhancer"},
    "segment": {"data", "training", "runs", "enhancer"},
    # runs the stage scripts as commands; parses their flags with their own parsers before any work;
    # reads pretrain.py's recipe rules; runs.py's one-line errors
    "study": {"pretrain", "finetune", "segment", "dvae", "runs"},
}
# outside the standard library
LIBRARIES = {
    "data": {"torch", "numpy", "PIL"},
    "training": {"torch", "numpy"},  # copied out alone: torch and numpy only
    "runs": {"torch"},
    "enhancer": {"torch"},
    "generator": {"torch"},
    "dvae": {"torch", "tqdm"},
    "pretrain": {"torch", "tqdm"},
    "bench": {"torch"},  # timm / torchvision only looked up by name, when installed
    "finetune": {"torch", "numpy", "PIL", "tqdm"},
    "segment": {"torch", "numpy", "PIL", "tqdm"},
    "study": {"PIL", "torch"},  # the k-NN plot; the tokenizer checkpoint's step
}


def imported_modules(path):
    """Top-level names of every module a file imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_import_graph_and_libraries(name):
    path = os.path.join(REPO, name + ".py")
    if not os.path.isfile(path):
        pytest.skip(f"{name}.py is not written yet")
    names = imported_modules(path)
    assert names & PROJECT - {name} <= GRAPH[name], f"{name}.py imports {sorted(names & PROJECT)}"
    outside = {n for n in names - PROJECT if n not in sys.stdlib_module_names}
    assert outside <= LIBRARIES[name], f"{name}.py imports {sorted(outside)}"


def test_stage_files_hold_no_shared_helpers_twice():
    """training.py is the one home of the loop parts: no stage defines them again."""
    shared = {"init_distributed", "autocast", "cosine_lr", "save_checkpoint", "load_checkpoint",
              "seed_everything", "gather_rng_states", "knn_classify", "print_args", "finish_distributed"}
    for name in GRAPH:
        path = os.path.join(REPO, name + ".py")
        if name == "training" or not os.path.isfile(path):
            continue
        defined = {n.name for n in ast.walk(ast.parse(open(path).read()))
                   if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert not defined & shared, f"{name}.py defines {sorted(defined & shared)}"


COPIED_OUT = """
import sys
sys.path.insert(0, sys.argv[1])  # python -I: only the standard paths and the copied files
import torch
import enhancer
backbone = enhancer.build_backbone("vit_mini", img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
model = enhancer.Enhancer(backbone, "revdet", 4, "window", 5)
out, loss, _ = model(torch.randn(2, 3, 32, 32), None, torch.rand(2, 16) > 0.5)
loss.backward()
assert out.shape == (2, 16) and torch.isfinite(loss)
# a pre-training checkpoint's backbone comes back out of the file with enhancer.py alone
full = enhancer.build_backbone("vit_mini", img_size=32, patch_size=8)
ckpt = {"model": {"enhancer.backbone." + k: v for k, v in full.state_dict().items()}, "args": {"img_size": 32}}
torch.save(ckpt, sys.argv[1] + "/checkpoint.pth")
loaded, config = enhancer.load_backbone(sys.argv[1] + "/checkpoint.pth")
assert config == dict(arch="vit_mini", img_size=32, patch_size=8, init_values=None), config
assert all(torch.equal(v, full.state_dict()[k]) for k, v in loaded.state_dict().items())
if len(sys.argv) > 2:
    import generator
    g = generator.BEiTGenerator(32, 8, vocab_size=64, embed_dim=32, depth=1, num_heads=2)
    mask = generator.mask_patches("random", 2, 4, 0.5)
    logits, loss = g(torch.randn(2, 3, 32, 32), mask, torch.randint(64, (2, 16)))
    assert logits.shape == (16, 64) and torch.isfinite(loss)
    assert generator.sample_tokens(logits).shape == (16,)
print("ok", sorted(m for m in sys.modules if m in {"data", "training", "dvae", "pretrain"}))
"""


@pytest.mark.parametrize("files", [("enhancer.py",), ("generator.py", "enhancer.py")])
def test_model_files_run_when_copied_out_alone(tmp_path, files):
    for f in files:
        shutil.copy(os.path.join(REPO, f), tmp_path / f)
    script = tmp_path / "use_them.py"
    script.write_text(COPIED_OUT)
    extra = ["with-generator"] if "generator.py" in files else []
    proc = subprocess.run([sys.executable, "-I", str(script), str(tmp_path), *extra], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok []"


TRAINING_COPIED_OUT = """
import sys
sys.path.insert(0, sys.argv[1])  # python -I: only the standard paths and the copied file
import torch
import training
rank, world_size, device = training.init_distributed("cpu")
training.seed_everything(0, rank)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
optimizer = torch.optim.AdamW(training.param_groups(model, 0.05), lr=1e-3)
scaler = torch.amp.GradScaler("cpu", enabled=False)
skips = training.SkipCount("copied", 0, sys.argv[1])
for step in range(3):
    for g in optimizer.param_groups:
        g["lr"] = training.cosine_lr(step, 3, 1, 1e-3, 1e-5)
    with training.autocast(device, "bf16"):
        loss = model(torch.randn(16, 4)).float().pow(2).mean()
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    _, status = training.optimizer_step(model, optimizer, scaler, torch.isfinite(loss.detach()), 1.0, device)
    assert skips(status, step + 1)
path = sys.argv[1] + "/checkpoint-latest.pth"
for _ in range(2):
    training.save_checkpoint({"model": model.state_dict(), "rng": training.gather_rng_states(device)}, path,
                             keep_previous=True)
assert torch.equal(training.load_checkpoint(path)["model"]["0.weight"], model[0].weight)
assert training.load_checkpoint(training.previous_path(path))["model"].keys() == model.state_dict().keys()
training.JsonLog(sys.argv[1] + "/log.jsonl").write(step=3, loss=loss.item())
feats = torch.nn.functional.normalize(torch.randn(10, 8), dim=1)
votes = training.knn_classify(feats, torch.arange(10) % 2, feats, 2, k=3)
assert (votes.argmax(1) == torch.arange(10) % 2).all()  # each point is its own nearest neighbour
training.finish_distributed()
print("ok", sorted(m for m in sys.modules if m in {"data", "runs", "dvae", "pretrain", "enhancer"}))
"""


def test_training_runs_when_copied_out_alone(tmp_path):
    """The loop parts (distributed init, autocast, the step and its skip rule, parameter groups,
    schedules, RNG state, atomic save, the log, k-NN) need no other project file and no run bookkeeping."""
    shutil.copy(os.path.join(REPO, "training.py"), tmp_path / "training.py")
    script = tmp_path / "use_it.py"
    script.write_text(TRAINING_COPIED_OUT)
    proc = subprocess.run([sys.executable, "-I", str(script), str(tmp_path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": os.environ.get("PATH", "")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok []"


def table_column(path, header):
    """The first column of the markdown table under `header` (its header row), as written."""
    lines = open(os.path.join(REPO, path)).read().split("\n")
    start = lines.index(header) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1].strip())
    return rows


def test_the_step_is_numbered_the_same_in_code_readme_walkthrough_and_explain_png():
    """0 the batch, 1 tokens, 2 generator, 3 samples, 4 mix and label, 5 decode, 6 enhancer, 7 loss and
    update: CIM.forward's comments (with train_step's 0), the README table, docs/walkthrough.md's table
    and the rows of explain.png (pretrain.EXPLAIN_ROWS and the walkthrough's list of them)."""
    import inspect
    import re
    import pretrain
    code = [int(n) for f in (pretrain.train_step, pretrain.CIM.forward)
            for n in re.findall(r"^\s*# (\d)\. ", inspect.getsource(f), re.M)]
    assert code == list(range(8))
    readme = [int(n) for n in table_column("README.md", "| # | where | what | shape (ViT-B/16, DALL-E) |")]
    walk = [int(n) for n in table_column("docs/walkthrough.md", "| # | where | what | shape |")]
    for steps in (readme, walk):
        assert sorted(set(steps)) == list(range(8)) and steps == sorted(steps), steps
    rows = [int(r.split()[0]) for r in pretrain.EXPLAIN_ROWS]
    assert rows == sorted(rows) and set(rows) <= set(range(8))
    drawn = table_column("docs/walkthrough.md", "| row | what it shows | the lines that make it |")
    assert drawn[:-1] == list(pretrain.EXPLAIN_ROWS[:-1]) and drawn[-1].startswith("6 ")


def test_every_number_in_the_readme_quick_start_is_in_a_page_it_links():
    """The quick start's numbers (accuracies, minutes, the suite's count and time) are quoted from the
    docs pages it links to, where their command and machine are: none may stand in the README alone."""
    import re
    text = open(os.path.join(REPO, "README.md")).read()
    section = text[text.index("## Quick start"):text.index("## The paper's path")]
    pages = sorted(set(re.findall(r"\]\((docs/[^)#]+)", section)))
    assert pages, "the quick start links no docs page"
    docs = "".join(open(os.path.join(REPO, p)).read() for p in pages)
    prose = re.sub(r"```.*?```", "", section, flags=re.S)  # the commands and the printed line: as run
    numbers = re.findall(r"(?<![\w.])\d+\.\d+(?![\w.])", prose) + re.findall(r"\b(\d+) tests\b", prose) \
        + re.findall(r"\b(\d+) s\b", prose)
    assert numbers
    assert [n for n in numbers if n not in docs] == [], f"not in {pages}"


def test_readme_and_docs_name_no_path_outside_the_repository():
    import glob
    pages = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
    found = [f"{os.path.relpath(p, REPO)}:{i}" for p in pages for i, line in enumerate(open(p), 1) if "../" in line]
    assert found == []
