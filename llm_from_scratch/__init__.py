"""LLM from Scratch: the companion package of the course.

Each module holds one concept of the pipeline, in the order the book builds it:

    data -> bpe -> linear -> attention -> loss -> model -> registry -> metrics -> checkpoint -> train
    -> pretrained -> generate -> distributed -> lora -> finetune

``lora`` and ``finetune`` open the second half of the book, "Making it useful": they import the
first half and are never imported by it (``registry`` lists the first half's models; ``finetune``
registers its classifier there when imported).

``roofline`` and ``quantize`` (the bytes a decode step reads and the ceiling they set; int8 and
bfloat16 weights for fast decoding; chapter "Fast generation") are in the second half too: only the
command lines of ``generate`` and ``chat`` reach into ``quantize``.

``instruct``, ``dpo`` and ``chat`` (the chapter "Following instructions": chat template, SFT,
DPO, the chat loop of ``python -m llm_from_scratch chat`` / ``serve``) are in the second half of the
book too, "Making it useful": they import the first half and are never imported by it.

Chapters import from here; nothing is copied between chapters. See the book's
introduction for the map. Functions named like their module (``train.train``,
``generate.generate``) are not re-exported, so ``llm_from_scratch.train`` stays the module.
"""

from llm_from_scratch.attention import KVCache, MultiHeadAttention, causal_mask, scaled_dot_product_attention
from llm_from_scratch.bpe import (
    BPETokenizer,
    CourseData,
    course_data,
    gpt2_encoding,
    train_bpe,
    train_or_load_tokenizer,
)
from llm_from_scratch.chat import ChatSession, ChatSettings, MessageError, build_prompt, create_app
from llm_from_scratch.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_NAME,
    load_checkpoint,
    save_checkpoint,
    tokenizer_fingerprint,
)
from llm_from_scratch.data import (
    SimpleTokenizer,
    SlidingWindowDataset,
    TokenFile,
    available_corpora,
    clean_text,
    create_dataloader,
    load_corpus,
    load_documents,
    train_val_split,
    write_token_file,
)
from llm_from_scratch.dpo import PreferenceDataset, dpo_loss, preference_pairs, response_logprobs, train_dpo
from llm_from_scratch.finetune import (
    ClassifierConfig,
    FinetuneConfig,
    GPTClassifier,
    LabelledTexts,
    genre_dataset,
    genre_split,
)
from llm_from_scratch.generate import (
    generate_text,
    load_model,
    pad_prompts,
    sample_next_token,
    stream_generate,
    top_k_filter,
    top_p_filter,
)
from llm_from_scratch.instruct import (
    InstructionDataset,
    chat_tokenizer,
    encode_example,
    exact_match,
    generate_answers,
    load_chat_model,
    python_instructions,
    resize_token_embeddings,
    save_chat_model,
    shakespeare_instructions,
    split_by_item,
    train_sft,
)
from llm_from_scratch.linear import Linear
from llm_from_scratch.lora import LoRAEmbedding, LoRALinear, apply_lora, merge_lora
from llm_from_scratch.loss import cross_entropy
from llm_from_scratch.metrics import TextStats, text_stats
from llm_from_scratch.model import GPT, GPTConfig, count_parameters, estimate_flops_per_token
from llm_from_scratch.modern import (
    GroupedQueryAttention,
    ModernConfig,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    TransformerLM,
    apply_rope,
)
from llm_from_scratch.pretrained import PretrainSettings, pretrain, pretrained_model
from llm_from_scratch.quantize import (
    BF16Linear,
    F32Linear,
    Int8Linear,
    dequantize_int8,
    load_quantized,
    quantize_int8,
    quantize_model,
    save_quantized,
)
from llm_from_scratch.registry import MODEL_CLASSES, register_model
from llm_from_scratch.train import (
    TrainConfig,
    bits_per_char,
    configure_optimizer,
    evaluate,
    lr_at,
)
from llm_from_scratch.utils import artifacts_dir, get_device, seed_everything, show_source

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # utils
    "artifacts_dir",
    "get_device",
    "seed_everything",
    "show_source",
    # data
    "SimpleTokenizer",
    "SlidingWindowDataset",
    "TokenFile",
    "available_corpora",
    "clean_text",
    "create_dataloader",
    "load_corpus",
    "load_documents",
    "train_val_split",
    "write_token_file",
    # bpe
    "BPETokenizer",
    "CourseData",
    "course_data",
    "gpt2_encoding",
    "train_bpe",
    "train_or_load_tokenizer",
    # linear
    "Linear",
    # loss
    "cross_entropy",
    # metrics
    "TextStats",
    "text_stats",
    # attention
    "KVCache",
    "MultiHeadAttention",
    "causal_mask",
    "scaled_dot_product_attention",
    # model
    "GPT",
    "GPTConfig",
    "count_parameters",
    "estimate_flops_per_token",
    # pretrained
    "PretrainSettings",
    "pretrain",
    "pretrained_model",
    # registry
    "MODEL_CLASSES",
    "register_model",
    # checkpoint
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "load_checkpoint",
    "save_checkpoint",
    "tokenizer_fingerprint",
    # train
    "TrainConfig",
    "bits_per_char",
    "configure_optimizer",
    "evaluate",
    "lr_at",
    # generate (generate.generate stays under its module, like train.train)
    "generate_text",
    "load_model",
    "pad_prompts",
    "sample_next_token",
    "stream_generate",
    "top_k_filter",
    "top_p_filter",
    # lora
    "LoRAEmbedding",
    "LoRALinear",
    "apply_lora",
    "merge_lora",
    # finetune (finetune.finetune stays under its module)
    "ClassifierConfig",
    "FinetuneConfig",
    "GPTClassifier",
    "LabelledTexts",
    "genre_dataset",
    "genre_split",
    # instruct (chapter "Following instructions")
    "InstructionDataset",
    "chat_tokenizer",
    "encode_example",
    "exact_match",
    "generate_answers",
    "load_chat_model",
    "resize_token_embeddings",
    "save_chat_model",
    "python_instructions",
    "shakespeare_instructions",
    "split_by_item",
    "train_sft",
    # dpo
    "PreferenceDataset",
    "dpo_loss",
    "preference_pairs",
    "response_logprobs",
    "train_dpo",
    # chat
    "ChatSession",
    "ChatSettings",
    "MessageError",
    "build_prompt",
    "create_app",
    # quantize
    "BF16Linear",
    "F32Linear",
    "Int8Linear",
    "dequantize_int8",
    "load_quantized",
    "quantize_int8",
    "quantize_model",
    "save_quantized",
    # modern
    "GroupedQueryAttention",
    "ModernConfig",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "TransformerLM",
    "apply_rope",
]
