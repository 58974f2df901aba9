"""experiments/benchmarks/train_throughput.py in CI size: both paths train the same weights and
report figures (no speed is asserted: CI machines are shared)."""

import json
import math

from experiments.benchmarks.train_throughput import main


def test_both_paths_train_the_same_parameters_and_report_their_throughput(tmp_path, capsys):
    out = tmp_path / "figures.json"
    argv = ["--strategies", "lora", "--resolution", "16", "--batch-size", "2", "--warmup-steps", "2"]
    main([*argv, "--steps", "3", "--sample-steps", "2", "--out", str(out)])

    figures = json.loads(out.read_text())
    lora = figures["strategies"]["lora"]
    assert lora["same_batch"]  # the plain loop's held batch equals the one medsd's fit served
    assert lora["training_flops_per_image"] > 0
    paths = lora["paths"]
    assert set(paths) == {"plain", "medsd", "medsd_lean"}
    for path in paths.values():
        assert path["images_per_second"] > 0 and path["median_seconds_per_step"] > 0
        assert math.isfinite(path["ratio_to_plain"]) and path["ratio_to_plain"] > 0
        assert path["flops_per_second"] > 0
        assert path["mfu"] is None  # no peak on a CPU
        assert path["peak_memory_bytes"] > 0
    assert paths["plain"]["ratio_to_plain"] == 1.0

    # Only LoRA's adapter weights train, in both paths, and every one of them moved.
    trainable = paths["plain"]["trainable"]
    assert trainable and all(".lora_" in name for name in trainable)
    for path in paths.values():
        assert path["trainable"] == trainable
        assert path["changed"] == trainable
    # The same learning rates step by step (medsd trains one step more, to time the last one).
    rates = paths["plain"]["learning_rates"]
    assert len(rates) == 5 and rates[-1] > 0
    assert paths["medsd"]["learning_rates"][:5] == rates
    assert lora["sampling"]["images_per_second"] > 0

    printed = capsys.readouterr().out
    for row in ("lora | plain |", "lora | medsd |", "lora | medsd_lean |", "lora | sampling (2 steps"):
        assert row in printed
