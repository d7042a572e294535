"""BERT (BertForMaskedLM, BertModel): post-norm encoder with its MLM head and pooler."""

from __future__ import annotations

from llmcli.config import ModelConfig
from llmcli.interop.tables import Family, Rule, params, stack


BERT_BLOCK = [
    *params("attn.q_proj", "attention.self.query"),
    *params("attn.k_proj", "attention.self.key"),
    *params("attn.v_proj", "attention.self.value"),
    *params("attn.o_proj", "attention.output.dense"),
    *params("attn_norm", "attention.output.LayerNorm"),
    *params("ff.up", "intermediate.dense"),
    *params("ff.down", "output.dense"),
    *params("ff_norm", "output.LayerNorm"),
]

BERT_MLM_HEAD = [
    *params("mlm_head.dense", "cls.predictions.transform.dense"),
    *params("mlm_head.norm", "cls.predictions.transform.LayerNorm"),
    Rule(("mlm_head.bias",), "cls.predictions.bias"),
]


def _bert_rules(cfg: ModelConfig) -> list[Rule]:
    return [
        *params("tok_emb", "bert.embeddings.word_embeddings", bias=False),
        *(params("type_emb", "bert.embeddings.token_type_embeddings", bias=False) if cfg.type_vocab_size else []),
        *params("encoder.pos_emb", "bert.embeddings.position_embeddings", bias=False),
        *params("encoder.emb_norm", "bert.embeddings.LayerNorm"),
        *stack("encoder.blocks.", "bert.encoder.layer.", cfg.n_layers, BERT_BLOCK),
        *(params("pooler", "bert.pooler.dense") if cfg.pooler else []),
        *BERT_MLM_HEAD,
        *([] if cfg.tie_embeddings else params("lm_head", "cls.predictions.decoder", bias=False)),
    ]



# Defaults are those of transformers' BertConfig.
BERT = Family(
    family="bert", model_type="bert", architecture="BertForMaskedLM", reads=("BertForMaskedLM", "BertModel"),
    base_prefix="bert.", rules=_bert_rules,
    fields=(("vocab_size", "vocab_size", 30522), ("d_model", "hidden_size", 768),
            ("n_layers", "num_hidden_layers", 12), ("n_heads", "num_attention_heads", 12),
            ("d_ff", "intermediate_size", 3072), ("max_seq_len", "max_position_embeddings", 512),
            ("type_vocab_size", "type_vocab_size", 2), ("norm_eps", "layer_norm_eps", 1e-12),
            ("dropout", "hidden_dropout_prob", 0.1)),
    activation_key="hidden_act", activation_default="gelu",
    activations={"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"},
    fixed={"position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False},
    requires={"position": "learned", "norm": "layernorm", "norm_position": "post", "bias": True,
              "parallel_block": False},
    emb_key="bert.embeddings.word_embeddings.weight", head_key="cls.predictions.decoder.weight",
    ignored=r"embeddings\.(position_ids|token_type_ids)$",
    copies={"cls.predictions.decoder.bias": "cls.predictions.bias"},
    dropped=r"^cls\.seq_relationship\.",  # BERT's next-sentence head
    fresh=("mlm_head.", "lm_head."),
    # BertForMaskedLM has no pooler: a checkpoint without one becomes pooler = false.
    extra_from_hf=lambda hf, state, where: {"pooler": "bert.pooler.dense.weight" in state},
    extra_to_hf=lambda cfg: {"attention_probs_dropout_prob": cfg.dropout, "pad_token_id": 0},
)
