"""Tokenizer: `tokenizer.json` (HF `tokenizers`) plus the Jinja chat template of `tokenizer_config.json`.

Boundary: text <-> token ids and chat rendering only; no model, no torch. Also builds the small
byte-level BPE that `dsv3 tiny` ships, trained deterministically on a text kept in this file.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from .errors import DsvError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
# Ids 0..4 in this order: BOS 0 and EOS 1 as on DeepSeek's tokenizer.
SPECIAL_TOKENS = [BOS, EOS, PAD, USER, ASSISTANT]

# DeepSeek-style chat format, written for dsv3: BOS, the system prompt(s) verbatim, then
# <｜User｜>text and <｜Assistant｜>text<｜end▁of▁sentence｜> turns; the generation prompt is <｜Assistant｜>.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + (ns.system and '\\n\\n' or '') + m['content'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- bos_token ~ ns.system -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}"
    "{{- '<｜User｜>' ~ m['content'] -}}"
    "{%- elif m['role'] == 'assistant' -%}"
    "{{- '<｜Assistant｜>' ~ (m['content'] or '') ~ eos_token -}}"
    "{%- elif m['role'] != 'system' -%}"
    "{{- raise_exception('unknown chat role ' ~ m['role'] ~ '; use system, user or assistant') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜>' -}}{%- endif -%}"
)

# DeepSeek-V3's pre-tokenizer (its tokenizer.json): digits in runs of at most 3, runs of CJK
# ideographs and kana, then words / punctuation / whitespace; bytes mapped as GPT-2 does after.
DEEPSEEK_V3_SPLITS = (
    '\\p{N}{1,3}',
    '[一-龥\u3040-ゟ゠-ヿ]+',
    '[!"#$%&\'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+'
    '| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+',
)

# Training text for the tiny tokenizer (original prose; varied words, digits, punctuation, code).
TRAINING_TEXT = """\
The harbour was quiet before dawn. Three fishing boats rocked against the pier, their ropes
creaking, while a grey cat walked the length of the wall as if it owned the town. By six o'clock
the bakery on the corner had opened, and the smell of bread drifted down to the water.
Mira counted the crates twice: 48 of apples, 17 of pears, and 5 of something nobody had labelled.
"We ship at noon," she said. "If the truck is late again, we will miss the ferry and lose a day."
Her brother laughed, not unkindly, and went to find coffee.

Mixture-of-experts models route every token to a few experts out of many. A small router scores
each expert; the highest scores win, and their outputs are summed with weights. Because only a
few experts run for each token, the model can hold far more parameters than it computes with.
Balancing the load matters: if one expert receives most tokens, it becomes a bottleneck while
others sit idle. A bias added to the scores, adjusted during training, keeps the load even
without an extra loss term.

Latent attention compresses keys and values into a short vector per token, so the cache that
grows with the context is small. At inference the compressed vector can be absorbed into the
query and output projections, and attention runs directly against the latent cache.

def mean(values):
    total = 0.0
    for v in values:
        total += v
    return total / max(len(values), 1)

for i in range(10):
    print(i, i * i, mean([i, i + 1, i + 2]))

Weather report for Tuesday: morning fog along the coast, clearing by 11:00; highs of 21 C
inland and 18 C by the sea; wind from the west at 15 to 25 km/h. Wednesday looks drier, with
sunshine for most of the day and a chance of showers in the hills after 4 p.m.

Questions people ask: How long does it take to learn to play the piano? Why is the sky blue?
What is the capital of Australia? Can you explain how a bicycle stays upright? Which is heavier,
a kilogram of feathers or a kilogram of iron? When did the first train run between two cities?

A recipe for a simple soup: chop two onions, three carrots and a stick of celery. Soften them in
olive oil for ten minutes, add a litre of stock and a tin of tomatoes, then simmer for twenty
minutes. Season with salt, pepper and a little thyme. Blend half of it for a thicker texture.

The library opens at 9:30 on weekdays and at 10:00 on Saturdays. Members may borrow up to eight
books at a time, for three weeks, and renew them online twice. Late returns cost 20 cents a day.

Numbers and symbols: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2.71828 -42 +7 50% $19.99 #1 a=b+c
x*y/z (a, b) [c, d] {e: f} <tag> "quoted" 'single' user@example.org https://example.org/path?q=1

She opened the letter slowly. It was short, written in blue ink, and it said only that the house
by the river was hers now, together with everything in it, and that the key was under the stone.
Café, naïve, façade, über, señor, smörgåsbord: words borrowed from other languages keep accents.

Good software is small and direct. Functions do one thing, names say what they hold, and errors
tell the user what went wrong and what to do next. Tests use real files and real processes, and
every fast path is checked against a slow, simple reference on fresh random inputs.
"""


# ---- building the tiny tokenizer --------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def build_tokenizer_json(vocab_size: int, text: str = TRAINING_TEXT) -> str:
    """A byte-level BPE of at most `vocab_size` tokens (specials first), as tokenizer.json text,
    trained on `text` (scripts/mini_train.py passes its corpus). Deterministic: the trainer breaks ties by
    pair order, and the input is fixed."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise DsvError(f"vocab_size {vocab_size}: a byte-level tokenizer needs at least {len(SPECIAL_TOKENS) + 256}")
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in DEEPSEEK_V3_SPLITS]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    return tok.to_str(pretty=True)


def _added(content: str) -> dict[str, Any]:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def tokenizer_config(model_max_length: int) -> dict[str, Any]:
    return {
        "bos_token": _added(BOS),
        "eos_token": _added(EOS),
        "pad_token": _added(PAD),
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer_files(folder: str | Path, vocab_size: int, model_max_length: int = 4096,
                          text: str = TRAINING_TEXT) -> None:
    """tokenizer.json + tokenizer_config.json in the hub's form (atomic writes)."""
    from .checkpoint import atomic_output, write_json

    folder = Path(folder)
    with atomic_output(folder / "tokenizer.json") as tmp:
        tmp.write_text(build_tokenizer_json(vocab_size, text), encoding="utf-8")
    write_json(folder / "tokenizer_config.json", tokenizer_config(model_max_length))


# ---- loading ----------------------------------------------------------------------------------

def _token_str(v: Any) -> str | None:
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


class Tokenizer:
    """encode/decode through `tokenizers`, chat rendering through a sandboxed Jinja environment."""

    def __init__(self, folder: Path, tok: Any, config: dict[str, Any], generation_config: dict[str, Any]):
        self.folder = folder
        self._tok = tok
        self.config = config
        self.bos_token = _token_str(config.get("bos_token"))
        self.eos_token = _token_str(config.get("eos_token"))
        self.bos_id = tok.token_to_id(self.bos_token) if self.bos_token else None
        eos: list[int] = []
        if self.eos_token and tok.token_to_id(self.eos_token) is not None:
            eos.append(tok.token_to_id(self.eos_token))
        g = generation_config.get("eos_token_id")
        for e in g if isinstance(g, list) else [g] if g is not None else []:
            if isinstance(e, int) and e not in eos:
                eos.append(e)
        self.eos_ids = eos
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, list):  # some repos store named templates
            named = {t.get("name"): t.get("template") for t in self.chat_template if isinstance(t, dict)}
            self.chat_template = named.get("default")

    def encode(self, text: str) -> list[int]:
        """Token ids; special tokens written in the text are recognised; no BOS is added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    @functools.cached_property
    def _template(self):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        if not self.chat_template:
            raise DsvError(f"{self.folder / 'tokenizer_config.json'}: no chat_template; pass raw text with --raw instead")

        def raise_exception(msg: str) -> None:
            raise DsvError(f"chat template: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template)
        except TemplateError as e:
            raise DsvError(f"{self.folder / 'tokenizer_config.json'}: chat_template does not parse ({e})") from e

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Render messages ([{"role": "user", "content": "..."}, ...]) to the prompt text."""
        from jinja2 import TemplateError

        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DsvError(f"chat message {m!r}: needs a role and a content")
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise DsvError(f"{self.folder / 'tokenizer_config.json'}: chat_template failed to render ({e})") from e


def _read_json(p: Path) -> dict[str, Any]:
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DsvError(f"{p}: not valid JSON ({e})") from e
    return d if isinstance(d, dict) else {}


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint folder (tokenizer.json + tokenizer_config.json [+ generation_config.json])."""
    from tokenizers import Tokenizer as HFTokenizer

    folder = Path(folder)
    p = folder / "tokenizer.json"
    if not p.is_file():
        raise DsvError(f"{folder}: no tokenizer.json; a checkpoint folder needs its tokenizer files (dsv3 download fetches them)")
    try:
        tok = HFTokenizer.from_file(str(p))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception on bad files
        raise DsvError(f"{p}: cannot load ({e})") from e
    return Tokenizer(folder, tok, _read_json(folder / "tokenizer_config.json"), _read_json(folder / "generation_config.json"))
