"""The tiny local Llama: deterministic files that load through transformers' own loaders."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from pacore.testing.tiny_model import EOS_TOKEN, build_tiny_llama, main


def test_same_seed_same_files(tmp_path: Path, tiny_model_dir: Path) -> None:
    again = build_tiny_llama(tmp_path / "again")
    names = sorted(p.name for p in tiny_model_dir.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    _, mismatch, errors = filecmp.cmpfiles(tiny_model_dir, again, names, shallow=False)
    assert (mismatch, errors) == ([], [])


def test_loads_with_auto_classes_offline(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir, local_files_only=True)
    assert config.model_type == "llama"
    assert config.num_hidden_layers == 2
    assert config.hidden_size == 64
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    assert 256 < len(tokenizer) <= 512
    assert tokenizer.eos_token == EOS_TOKEN
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    assert sum(p.numel() for p in model.parameters()) < 200_000

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "héllo, wörld 👋"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == prompt  # byte-level: any text round-trips
    assert tokenizer.unk_token_id not in ids


def test_cli_writes_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "model.safetensors").is_file()
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert main([]) == 2
