"""stabguard.testing.warm: the warm tiny model is built once per content hash and learns (loss falls)."""

import json

import stabguard.testing.warm as warm


def test_the_warm_model_is_built_once_per_content_hash_and_has_learned(tmp_path, monkeypatch):
    monkeypatch.setattr(warm, "WARM_STEPS", 50)  # the real 300 take ~35 s; 50 already halve the loss
    calls = []
    real = warm._warm_up
    monkeypatch.setattr(warm, "_warm_up", lambda *a: calls.append(a) or real(*a))
    first = warm.warm_tiny_assets(tmp_path)
    summary = json.loads((first["model"].parent / "warm.json").read_text())
    assert summary["steps"] == 50 and summary["last_50_loss"] < summary["first_loss"] / 2
    assert first["train"].is_file() and (first["model"] / "config.json").is_file()
    assert warm.warm_tiny_assets(tmp_path) == first and len(calls) == 1, "the second call reuses the cache"
    monkeypatch.setattr(warm, "WARM_LR", 1e-3)
    assert warm.warm_tiny_assets(tmp_path)["model"] != first["model"] and len(calls) == 2, "new settings, new hash"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({first["model"].parent.name,
                                                                 warm.warm_tiny_assets(tmp_path)["model"].parent.name})
