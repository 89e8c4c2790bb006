"""The flags of the stage scripts: declared once (parser line + recipe value), each numeric one checked
by its type, the same set of resume-free flags as the stage's resume rule needs, every recipe flag
given a value by every recipe."""
import argparse
import re

import pytest

import dvae
import finetune
import pretrain
import segment
import runs

STAGES = {"pretrain.py": pretrain, "finetune.py": finetune, "segment.py": segment, "dvae.py": dvae}
RUNTIME = {"output_dir", "resume", "allow_flag_changes", "save_every", "log_every", "device", "dist_backend",
           "local_rank"}
# what each stage may change on resume besides RUNTIME: how it writes, evaluates and runs, never what it trains
FREE = {
    "pretrain.py": {"num_workers", "sample_every", "knn_k", "knn_every", "knn_blocks", "compile", "max_skips",
                    "explain", "check_tokenizer", "min_tokenizer_perplexity"},
    "finetune.py": {"num_workers", "eval_batch_size", "max_skips"},
    "segment.py": {"num_workers", "eval_every", "eval_only", "mode", "stride", "eval_batch_size", "overlays",
                   "max_skips"},
    "dvae.py": {"num_workers", "sample_every", "max_skips"},
}
UNCHECKED = {"seed", "local_rank", "head_init_scale"}  # any integer seed or rank; a scale of any sign


@pytest.mark.parametrize("script", sorted(STAGES))
def test_resume_free_flags_are_exactly_the_runtime_ones(script):
    parser = STAGES[script].get_args_parser()
    assert parser.resume_free == RUNTIME | FREE[script]
    assert parser.prog == script


@pytest.mark.parametrize("script", sorted(STAGES))
def test_every_numeric_flag_is_checked_where_it_is_declared(script):
    for action in STAGES[script].get_args_parser()._actions:
        if action.type in (int, float) and action.dest not in UNCHECKED:
            pytest.fail(f"{script} {action.option_strings[0]} is a bare {action.type.__name__}: give it "
                        f"runs.number(...)")


def test_number_refuses_nan_and_out_of_range_with_the_rule():
    assert runs.number(float, "in (0, 1]")("1") == 1.0
    for rule, text in (("> 0", "0"), (">= 0", "-1e-9"), ("in [0, 1)", "1"), ("in (0, 1)", "0"), ("> 0", "nan"),
                       ("> 0", "inf")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be a number {re.escape(rule)}, got {text}"):
            runs.number(float, rule)(text)
    with pytest.raises(argparse.ArgumentTypeError, match="expected a whole number, got '2.5'"):
        runs.number(int, "> 0")("2.5")


@pytest.mark.parametrize("script, recipes", [("pretrain.py", pretrain.RECIPES), ("segment.py", segment.RECIPES)]
                         + [("finetune.py", {f"{r} {k}": v for r, kinds in finetune.RECIPES.items()
                                             for k, v in kinds.items()})])
def test_every_recipe_sets_the_same_flags_and_each_is_a_flag(script, recipes):
    dests = {a.dest for a in STAGES[script].get_args_parser()._actions}
    keys = [set(r) for r in recipes.values()]
    assert all(k == keys[0] for k in keys), [sorted(k ^ keys[0]) for k in keys]
    assert keys[0] <= dests, sorted(keys[0] - dests)


def test_finetune_recipes_are_published_ones_plus_their_differences():
    """Adding a flag to the recipes is one line in BEIT_B; every other recipe inherits it."""
    im = finetune.RECIPES["imagenet"]
    assert (im["vit_b"], im["vit_l"], im["resnet"], im["linear"]) == (finetune.BEIT_B, finetune.MAE_L,
                                                                      finetune.RSB_A2, finetune.MAE_LINEAR)
    for kind in list(finetune.RECIPES["builtin"].values()) + list(im.values()):
        assert set(kind) == set(finetune.BEIT_B)
    # the per-size table: epochs, warm-up (from), layer decay, drop path, optimiser, feature, repeats
    table = {k: (v["epochs"], v["warmup_epochs"], v["warmup_lr"], v["layer_decay"], v["drop_path"], v["opt"],
                 v["pool"], v["aug_repeats"]) for k, v in im.items()}
    assert table == {"vit": (100, 20, 0.0, 0.65, 0.1, "adamw", "avg", 1),      # BEiT-B
                     "vit_s": (100, 20, 0.0, 0.65, 0.1, "adamw", "avg", 1),    # BEiT-B's until the paper's
                     "vit_b": (100, 20, 0.0, 0.65, 0.1, "adamw", "avg", 1),    # BEiT-B
                     "vit_l": (50, 5, 0.0, 0.75, 0.2, "adamw", "avg", 1),      # MAE-L / BEiT-L
                     "resnet": (300, 5, 1e-4, 1.0, 0.05, "lamb", "avg", 3),    # RSB A2
                     "linear": (90, 10, 0.0, 1.0, 0.0, "lars", "cls", 1)}      # MAE's linear probe
    assert (finetune.RSB_A2["bce_target_thresh"], finetune.RSB_A2["clip_grad"]) == (0.2, 1.0)
    assert finetune.MAE_LINEAR["batch_size"] * 8 == 16384


@pytest.mark.parametrize("arch, recipe_kind", [("vit_l", "vit_l"), ("vit_s", "vit_s"), ("vit_t", "vit"),
                                               ("resnet50", "resnet")])
def test_each_model_size_gets_its_recipe(tmp_path, arch, recipe_kind):
    args = finetune.resolve_args(finetune.get_args_parser().parse_args(
        ["--init", "scratch", "--arch", arch, "--recipe", "imagenet", "--output-dir", str(tmp_path)]))
    expected = finetune.RECIPES["imagenet"][recipe_kind]
    assert (args.epochs, args.layer_decay, args.drop_path) == (expected["epochs"], expected["layer_decay"],
                                                                expected["drop_path"])
