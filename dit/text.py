"""Text encoders: transformers T5 / CLIP encoders and tokenizers from a local folder, and the demo's tiny one.

Everything loads with `local_files_only=True`: no checkpoint can be downloaded on our machines, so a missing
folder is an error here rather than a network request. The tiny word-level tokenizer and T5 encoder are
ordinary transformers objects saved in the standard format, so diffusers' CogVideoXPipeline (which calls
`tokenizer(prompt, padding="max_length", max_length=L, truncation=True, add_special_tokens=True)` and then
`text_encoder(input_ids)[0]`) uses them unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor
from transformers import (AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, PreTrainedModel,
                          PreTrainedTokenizerBase, PreTrainedTokenizerFast, T5Config, T5EncoderModel,
                          UMT5EncoderModel)

from dit.convert import library_load, read_folder_json, safetensors_files

# T5's special-token ids (pad 0, eos 1, unk 2), so a T5Config with its defaults agrees with the tokenizer.
PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, EOS_TOKEN, UNK_TOKEN)
TEXT_ENCODER_KINDS: tuple[str, ...] = ("auto", "t5", "clip")
# Encoder classes we load, by the `architectures` entry of their config.json; anything else is refused
# rather than guessed.
ENCODER_CLASSES: dict[str, type[PreTrainedModel]] = {
    "T5EncoderModel": T5EncoderModel,
    "UMT5EncoderModel": UMT5EncoderModel,  # Wan
    "CLIPTextModel": CLIPTextModel,
    "CLIPTextModelWithProjection": CLIPTextModelWithProjection,
}
# Tokenizer classes a pipeline's model_index.json may name (transformers 5 saves our fast tokenizers as
# TokenizersBackend; released CogVideoX / SD3 folders name the T5 and CLIP ones).
TOKENIZER_CLASSES: tuple[str, ...] = ("T5Tokenizer", "T5TokenizerFast", "CLIPTokenizer", "CLIPTokenizerFast",
                                      "PreTrainedTokenizerFast", "TokenizersBackend")
# transformers' weight file names: safetensors only, single or sharded.
ENCODER_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
_KIND_OF_MODEL_TYPE = {"t5": "t5", "umt5": "t5", "clip_text_model": "clip", "clip": "clip"}


def build_word_tokenizer(vocab_words: Iterable[str], max_length: int = 32) -> PreTrainedTokenizerFast:
    """Word-level tokenizer (tokenizers WordLevel): NFKC + lower-case, split on whitespace and punctuation,
    `</s>` appended like T5, padded with `<pad>`, unknown words -> `<unk>`; ids: pad 0, eos 1, unk 2, then
    the words in sorted order.

    `max_length` becomes `model_max_length`; callers such as CogVideoXPipeline pass their own max_length.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length={max_length!r} must be an integer >= 2 (at least one word and </s>)")
    words = sorted({str(w).lower() for w in vocab_words} - set(SPECIAL_TOKENS))
    if not words:
        raise ValueError("vocab_words is empty; give the words the captions use (e.g. dit.data.caption_words())")
    splitter = pre_tokenizers.Whitespace()
    bad = [w for w in words if [p for p, _ in splitter.pre_tokenize_str(w)] != [w]]
    if bad:
        raise ValueError(f"vocab words {bad[:5]} are not single tokens under the whitespace/punctuation split; "
                         "accepted: one word (\\w+) or one run of punctuation per entry")
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *words))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = splitter
    # T5 appends </s> to every sequence; the post-processor does it after truncation, so it survives.
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS_TOKEN}", pair=f"$A {EOS_TOKEN} $B {EOS_TOKEN}",
                                                       special_tokens=[(EOS_TOKEN, vocab[EOS_TOKEN])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN,
                                   unk_token=UNK_TOKEN, model_max_length=max_length, padding_side="right")


def build_tiny_t5_encoder(vocab_size: int, d_model: int = 64, *, num_layers: int = 2, num_heads: int = 4,
                          d_ff: int | None = None, relative_attention_num_buckets: int = 8,
                          relative_attention_max_distance: int = 32, seed: int | None = 0) -> T5EncoderModel:
    """A small T5 v1.1-style encoder (gated GELU, no dropout), the class CogVideoXPipeline takes as text_encoder.

    d_model is the embedding width the transformer sees (CogVideoX's `text_embed_dim`). `seed` makes the
    random initialisation reproducible without touching the global RNG; None uses the global RNG.
    """
    for name, value, low in (("vocab_size", vocab_size, len(SPECIAL_TOKENS) + 1), ("d_model", d_model, 1),
                             ("num_layers", num_layers, 1), ("num_heads", num_heads, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name}={value!r} must be an integer >= {low}")
    if d_model % num_heads:
        raise ValueError(f"d_model={d_model} must be divisible by num_heads={num_heads}")
    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // num_heads,
                      d_ff=d_ff if d_ff is not None else 2 * d_model, num_layers=num_layers, num_heads=num_heads,
                      relative_attention_num_buckets=relative_attention_num_buckets,
                      relative_attention_max_distance=relative_attention_max_distance, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, tie_word_embeddings=False)
    if seed is None:
        return T5EncoderModel(config).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(config).eval()


def save_text_encoder(folder: str | Path, tokenizer: PreTrainedTokenizerBase, text_encoder: PreTrainedModel, *,
                      tokenizer_subfolder: str = "tokenizer", encoder_subfolder: str = "text_encoder") -> Path:
    """Write `tokenizer/` and `text_encoder/` (safetensors) as a diffusers pipeline folder holds them."""
    folder = Path(folder)
    tokenizer.save_pretrained(folder / tokenizer_subfolder)
    text_encoder.save_pretrained(folder / encoder_subfolder, safe_serialization=True)
    return folder


def _encoder_class(encoder_dir: Path, kind: str) -> type[PreTrainedModel]:
    config = read_folder_json(encoder_dir, what="a transformers text encoder folder (save_pretrained)",
                              optional={"model_type": str, "architectures": list[str] | None})
    config_path = encoder_dir / "config.json"
    model_type = config.get("model_type")
    found_kind = _KIND_OF_MODEL_TYPE.get(model_type)
    if found_kind is None:
        raise ValueError(f"{config_path}: model_type={model_type!r} is not supported; accepted: "
                         f"{', '.join(map(repr, _KIND_OF_MODEL_TYPE))}")
    if kind != "auto" and kind != found_kind:
        raise ValueError(f"kind={kind!r} but {config_path} holds model_type={model_type!r} ({found_kind})")
    architectures = [a for a in config.get("architectures") or [] if a in ENCODER_CLASSES]
    if architectures:
        return ENCODER_CLASSES[architectures[0]]
    return T5EncoderModel if found_kind == "t5" else CLIPTextModel


def load_encoder_folder(folder: Path, cls: type[PreTrainedModel], torch_dtype: torch.dtype | None = None, *,
                        variant: str | None = None) -> PreTrainedModel:
    """A transformers text encoder from its own folder, safetensors only: a folder with nothing but a pickled
    pytorch_model.bin is refused before transformers sees it (unpickling can run code). Load errors (bad
    config, corrupt weights) are a ValueError naming the folder. `variant` ("fp16", ...): the weights
    `save_pretrained(variant=...)` wrote (model.<variant>.safetensors or its sharded index), as transformers reads
    them."""
    safetensors_files(folder, *ENCODER_WEIGHTS, variant=variant)
    kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    if variant is not None:
        kwargs["variant"] = variant
    return library_load(folder, f"a {cls.__name__} text encoder", lambda: cls.from_pretrained(
        folder, local_files_only=True, use_safetensors=True, **kwargs))


def load_tokenizer_folder(folder: Path, cls: type = AutoTokenizer) -> PreTrainedTokenizerBase:
    """A tokenizer from its own folder (never downloads); load errors are a ValueError naming the folder."""
    return library_load(folder, f"a {cls.__name__} tokenizer",
                        lambda: cls.from_pretrained(folder, local_files_only=True))


def load_text_encoder(path: str | Path, *, kind: str = "auto", tokenizer_subfolder: str = "tokenizer",
                      encoder_subfolder: str = "text_encoder", torch_dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Load (tokenizer, text encoder) from a local folder with `tokenizer/` and `text_encoder/` subfolders
    (a diffusers pipeline folder; SD3's T5 is `tokenizer_subfolder="tokenizer_3", encoder_subfolder=
    "text_encoder_3"`). kind: "auto" (from config.json), "t5" or "clip". Never downloads. The encoder is
    returned in eval mode."""
    if kind not in TEXT_ENCODER_KINDS:
        raise ValueError(f"kind={kind!r} is not supported; accepted: {', '.join(map(repr, TEXT_ENCODER_KINDS))}")
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"text encoder path {str(path)!r} is not a folder")
    tok_dir, enc_dir = root / tokenizer_subfolder, root / encoder_subfolder
    for name, sub in (("tokenizer", tok_dir), ("text encoder", enc_dir)):
        if not sub.is_dir():
            raise ValueError(f"{name} folder {str(sub)!r} is missing; expected {str(root)!r} to hold "
                             f"{tokenizer_subfolder}/ and {encoder_subfolder}/ as a diffusers pipeline folder does")
    cls = _encoder_class(enc_dir, kind)
    tokenizer = load_tokenizer_folder(tok_dir)
    encoder = load_encoder_folder(enc_dir, cls, torch_dtype)
    if device is not None:
        encoder = encoder.to(device)
    return tokenizer, encoder.eval()


def encode_prompts(prompts: str | Sequence[str], tokenizer: PreTrainedTokenizerBase, text_encoder: PreTrainedModel,
                   *, max_length: int | None = None, use_attention_mask: bool = False,
                   device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Tokenise like CogVideoXPipeline._get_t5_prompt_embeds and encode: returns embeddings (B, L, D) and the
    attention mask (B, L) (1 = token, 0 = padding), L = max_length (default: tokenizer.model_max_length).

    use_attention_mask=False matches CogVideoX and SD3, whose T5 sees the padding (the embeddings then equal
    the pipeline's exactly); True masks padding inside the encoder. The mask is returned either way.
    For CLIP the embeddings are the last hidden state. Gradients flow when the encoder has trainable
    parameters and grad is enabled: wrap the call in `torch.no_grad()` for a frozen encoder.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts={prompts!r} must be a string or a non-empty list of strings")
    max_length = tokenizer.model_max_length if max_length is None else max_length
    if not isinstance(max_length, int) or not 1 <= max_length <= 100_000:
        raise ValueError(f"max_length={max_length!r} must be a positive integer (the tokenizer's "
                         "model_max_length is used when None)")
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    device = device if device is not None else text_encoder.device
    ids = tokens.input_ids.to(device)  # (B, L)
    mask = tokens.attention_mask.to(device)  # (B, L)
    out = text_encoder(ids, attention_mask=mask if use_attention_mask else None)[0]  # (B, L, D)
    return out.to(dtype=dtype or text_encoder.dtype), mask
