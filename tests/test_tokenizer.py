"""merging.evaluation.tokenizer reproduces open_clip's SimpleTokenizer token for token, and
tokenizer_for chooses it exactly when open_clip.get_tokenizer would build a plain one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from merging.evaluation.tasks import REGISTRY_FILES, parse_registry
from merging.evaluation.tokenizer import ClipTokenizer, tokenizer_for

ROOT = Path(__file__).resolve().parents[1]

EDGE_TEXTS = [
    "",
    " ",
    "\n\t  \r\n",
    "a",
    "A photo of a Dog.",
    "a  lot   of\nwhite\tspace  ",
    "Crème brûlée, naïve café, Ünïcödé, façade",
    "e\u0301 (combining accent) and é (precomposed)",
    "İstanbul Straße ǅ ÀÉÎÕÜ ΣΊΣΥΦΟΣ Москва",
    "日本語のテキスト 中文 한국어",
    "مرحبا بالعالم",
    "emoji 🐶🚀👍🏽 and a family 👨\u200d👩\u200d👧",
    "&amp;lt;b&amp;gt; &quot;quoted&quot; Tom&#39;s &amp; Jerry's &nbsp;x&copy;",
    "&amp;amp;lt;i&amp;amp;gt; triple-escaped (ftfy unescapes once, open_clip twice more)",
    "<b>markup</b> keeps ftfy from unescaping &amp;amp; &amp;lt;",
    "CafÃ© mojibake â€œquotesâ€\x9d",
    "don't you'll we've I'm he'd they're it's DON'T",
    "numbers 1234567890 3.14 -42 1e10 ½ ²",
    "<start_of_text>hello<end_of_text> <START_OF_TEXT>",
    "punctuation!!!??? ... -- ___ {} [] ()",
    "control \x00\x07\x1b chars",
    "supercalifragilisticexpialidocious" * 5,
    "a photo of a cat " * 40,
]


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer


def registry_texts() -> dict[str, list[str]]:
    """Every prompt the zero-shot heads are built from (zeroshot.py: template.format(name)),
    per task, from every registry file (parsed separately so none overrides another)."""
    texts: dict[str, list[str]] = {}
    for path in REGISTRY_FILES:
        for name, task in parse_registry(json.loads(path.read_text())).tasks.items():
            texts[f"{path.parent.name}/{name}"] = [
                template.format(classname) for classname in task.classnames for template in task.templates
            ]
    return texts


def test_registry_prompts_match_open_clip(open_clip_tokenizer):
    texts = registry_texts()
    assert len(texts) >= 20 and sum(map(len, texts.values())) > 1000
    ours, theirs = ClipTokenizer(77), open_clip_tokenizer(context_length=77)
    short, theirs_short = ClipTokenizer(24), open_clip_tokenizer(context_length=24)
    for task, prompts in texts.items():
        assert torch.equal(ours(prompts), theirs(prompts)), task
        assert torch.equal(short(prompts), theirs_short(prompts)), task


@pytest.mark.parametrize("context_length", [24, 77])
def test_edge_cases_match_open_clip(open_clip_tokenizer, context_length):
    ours, theirs = ClipTokenizer(context_length), open_clip_tokenizer(context_length=context_length)
    for text in EDGE_TEXTS:
        expected = theirs(text)
        got = ours(text)
        assert got.dtype == torch.long and got.shape == (1, context_length), text
        assert torch.equal(got, expected), text
        assert ours.encode(text) == theirs.encode(text), text
    assert torch.equal(ours(EDGE_TEXTS), theirs(EDGE_TEXTS))


def test_special_ids_and_empty_text(open_clip_tokenizer):
    theirs = open_clip_tokenizer()
    ours = ClipTokenizer()
    assert (ours.sot_token_id, ours.eot_token_id, ours.vocab_size) == (
        theirs.sot_token_id,
        theirs.eot_token_id,
        theirs.vocab_size,
    )
    assert ours("")[0, :3].tolist() == [ours.sot_token_id, ours.eot_token_id, 0]


def test_truncation_keeps_eot_last(open_clip_tokenizer):
    for context_length in (24, 77):
        ours, theirs = ClipTokenizer(context_length), open_clip_tokenizer(context_length=context_length)
        fits = "cat " * (context_length - 2)  # "cat" is one token: sot + n + eot fills the context exactly
        too_long = "cat " * (context_length - 1)
        for text in (fits, too_long, "a photo of a cat " * 40):
            tokens = ours(text)
            assert torch.equal(tokens, theirs(text))
            assert tokens[0, 0] == ours.sot_token_id and tokens[0, -1] == ours.eot_token_id
        assert (ours(too_long)[0] == ours.eot_token_id).sum() == 1


def test_str_list_empty_list_and_call_length(open_clip_tokenizer):
    ours, theirs = ClipTokenizer(24), open_clip_tokenizer(context_length=24)
    assert torch.equal(ours("a photo of a dog"), ours(["a photo of a dog"]))
    assert ours(["a", "b", "c"]).shape == (3, 24)
    assert torch.equal(ours([]), theirs([])) and ours([]).shape == (0, 24)
    assert torch.equal(ours("a photo of a dog", context_length=77), theirs("a photo of a dog", context_length=77))


def test_import_and_tokenize_skip_open_clip():
    """The point of the module: no open_clip (nor what it drags in) to tokenize; and the
    vocabulary is read on the first tokenization, once per process, not at import."""
    code = (
        "import sys\n"
        "import merging.evaluation.tokenizer as tok\n"
        "tok.ClipTokenizer()\n"
        "assert tok._vocabulary.cache_info().currsize == 0\n"
        "t = tok.ClipTokenizer(24)(['a photo of a dog', 'Crème brûlée'])\n"
        "assert t.shape == (2, 24) and t[0, 0] == 49406\n"
        "tok.tokenizer_for({})('x')\n"
        "assert tok._vocabulary.cache_info().misses == 1\n"
        "heavy = [m for m in ('open_clip', 'torchvision', 'transformers', 'timm') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


PLAIN_CONFIGS = [
    {},
    {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    {"context_length": 77},
    {"hf_tokenizer_name": ""},  # open_clip tests truthiness: still the SimpleTokenizer
    {"tokenizer_kwargs": {}},
    {"tokenizer_mode": "clips"},  # only read together with an HF tokenizer
]
OPEN_CLIP_CONFIGS = [
    {"hf_tokenizer_name": "timm/ViT-B-16-SigLIP", "tokenizer_kwargs": {"clean": "canonicalize"}},
    {"hf_tokenizer_name": "xlm-roberta-base", "vocab_size": 250002},
    {"tokenizer_kwargs": {"clean": "canonicalize"}},
    {"tokenizer_kwargs": {"reduction_mask": "simple"}},
    {"tokenizer_kwargs": {"additional_special_tokens": ["<mask>"]}},
    {"tokenizer_kwargs": None},  # open_clip fails on it; the fallback reproduces that
    {"context_length": 76, "vocab_size": 64000},  # CoCa: SimpleTokenizer ids, but not CLIP's vocabulary
    {"context_length": None},
]


@pytest.mark.parametrize("text_cfg", PLAIN_CONFIGS)
def test_tokenizer_for_plain(text_cfg):
    tokenizer = tokenizer_for(text_cfg)
    assert isinstance(tokenizer, ClipTokenizer)
    assert tokenizer.context_length == text_cfg.get("context_length", 77)


@pytest.mark.parametrize("text_cfg", OPEN_CLIP_CONFIGS)
def test_tokenizer_for_needs_open_clip(text_cfg):
    assert tokenizer_for(text_cfg) is None


@pytest.fixture
def recorded_get_tokenizer(monkeypatch):
    """open_clip.get_tokenizer with its tokenizer classes replaced by recorders: which class it
    would build, with which arguments (no vocabulary read, no Hub download)."""
    import open_clip.factory as factory

    def recorder(kind):
        def build(*args, **kwargs):
            return (kind, args, kwargs)

        return build

    for kind in ("SimpleTokenizer", "HFTokenizer", "SigLipTokenizer"):
        monkeypatch.setattr(factory, kind, recorder(kind))
    return factory.get_tokenizer


def _is_plain(built, text_cfg) -> bool:
    """What tokenizer_for must recognise: a SimpleTokenizer with nothing but a context length,
    for a text tower with CLIP's vocabulary."""
    kind, args, kwargs = built
    length = kwargs.get("context_length")
    return (
        isinstance(length, int)
        and length > 0
        and kind == "SimpleTokenizer"
        and not args
        and set(kwargs) == {"context_length"}
        and text_cfg.get("vocab_size", 49408) == 49408
    )


@pytest.mark.parametrize("text_cfg", PLAIN_CONFIGS + OPEN_CLIP_CONFIGS)
def test_tokenizer_for_agrees_with_get_tokenizer(recorded_get_tokenizer, tmp_path, text_cfg):
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"text_cfg": text_cfg}}))
    try:
        built = recorded_get_tokenizer(f"local-dir:{tmp_path}")
    except AttributeError:  # tokenizer_kwargs: null
        assert tokenizer_for(text_cfg) is None
        return
    ours = tokenizer_for(text_cfg)
    assert (ours is not None) == _is_plain(built, text_cfg)
    if ours is not None:
        assert built[2]["context_length"] == ours.context_length


def test_tokenizer_for_agrees_on_builtin_configs(recorded_get_tokenizer):
    import open_clip

    plain = 0
    for name in open_clip.list_models():
        text_cfg = open_clip.get_model_config(name).get("text_cfg", {})
        built = recorded_get_tokenizer(name)
        ours = tokenizer_for(text_cfg)
        assert (ours is not None) == _is_plain(built, text_cfg), name
        if ours is not None:
            plain += 1
            assert built[2]["context_length"] == ours.context_length, name
    assert plain > 20  # ViT-B-32 & co.
    assert tokenizer_for(open_clip.get_model_config("ViT-B-32")["text_cfg"]).context_length == 77


def test_canonicalize_config_really_differs(open_clip_tokenizer):
    """Why tokenizer_kwargs send a config to open_clip: they change the tokens."""
    text = "A photo of a dog_breed, 'Tom's'."
    assert not torch.equal(ClipTokenizer()(text), open_clip_tokenizer(clean="canonicalize")(text))
