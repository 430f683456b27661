from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ramoe_ray.tokenizer import MIN_VOCAB, train_tokenizer

MGSM = Path(__file__).parents[2] / "shared/data/mgsm"


@pytest.fixture(scope="module")
def texts():
    out = []
    for f in sorted(MGSM.glob("mgsm_*.tsv")):
        out += [line.split("\t")[0] for line in f.read_text(encoding="utf-8").splitlines()[:60]]
    return out


def test_round_trip_through_auto_tokenizer(texts, tmp_path):
    tok = train_tokenizer(texts, vocab_size=800, out_dir=tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    assert len(loaded) == 800 and loaded.padding_side == "right"
    samples = texts[::37] + ["Ünïcödé ✓ 12,345 — 珍妮特 🦆", "text never seen: qwxz"]
    for s in samples:
        ids = loaded(s)["input_ids"]
        assert ids == tok(s)["input_ids"]
        assert loaded.decode(ids) == s
        assert 3 not in ids  # byte-level: never <unk>
        assert not {0, 1, 2} & set(ids)  # no special token added by encoding
    # the BPE learned merges: common text takes far fewer tokens than bytes
    assert len(loaded(texts[0])["input_ids"]) < len(texts[0].encode()) / 2
    batch = loaded(["Hi", texts[0]], padding=True)
    assert batch["input_ids"][0][-1] == 0 and batch["attention_mask"][0][-1] == 0  # right padding with <pad>=0


def test_training_is_deterministic(texts, tmp_path):
    train_tokenizer(texts, vocab_size=700, out_dir=tmp_path / "a")
    train_tokenizer(texts, vocab_size=700, out_dir=tmp_path / "b")
    files_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files_a == sorted(p.name for p in (tmp_path / "b").iterdir()) and "tokenizer.json" in files_a
    for name in files_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    other = train_tokenizer(texts[::-1][:100], vocab_size=700, out_dir=tmp_path / "c")
    assert other.get_vocab() != AutoTokenizer.from_pretrained(tmp_path / "a").get_vocab()


def test_rejects_too_small_vocab_and_no_text(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["abc"], vocab_size=MIN_VOCAB - 1, out_dir=tmp_path)
    with pytest.raises(ValueError, match="no"):
        train_tokenizer(["", ""], vocab_size=MIN_VOCAB + 10, out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
