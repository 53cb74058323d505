"""Tokenizers shaped like the real ones, built locally with ``tokenizers`` (no download):

- ``qwen``: byte-level BPE, no BOS, EOS ``<|endoftext|>``, a ChatML template whose assistant
  turns end with ``<|im_end|>`` (the layout of Qwen2.5 / Qwen2.5-Math);
- ``llama3``: byte-level BPE, BOS ``<|begin_of_text|>`` added by a TemplateProcessing
  post-processor (not by ``add_bos_token``), EOS ``<|end_of_text|>``, no pad token, a header
  template whose turns end with ``<|eot_id|>``, and ``<|eom_id|>`` (Llama 3.1 lists it among
  the generation config's EOS ids);
- ``sentencepiece``: Metaspace BPE with ``<s>`` added by the post-processor, no template
  (the layout of Llama 2 / Mistral converted tokenizers).

Each is saved as a folder and loaded back with ``oreo_fast.tokenizer.load_tokenizer``.
The templates are written here in the same markup as the public ones.
"""
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

CORPUS = ["Question: Tom has 3 apples and buys 4 more. How many apples?\nAnswer:\n",
          "3 + 4 = 7\nHe has 7 apples.\n#### 7", "The answer is \\boxed{7}.",
          "Please reason step by step, and put your final answer within \\boxed{}.",
          "What is 12 times 3? 12 * 3 = 36\n#### 36", "user assistant system"] * 4

QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def _byte_level(specials):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def build(kind: str, folder):
    """Save the ``kind`` tokenizer to ``folder`` and return the folder."""
    from transformers import PreTrainedTokenizerFast

    if kind == "qwen":
        tok = _byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                       pad_token="<|endoftext|>",
                                       additional_special_tokens=["<|im_start|>", "<|im_end|>"])
        fast.chat_template = QWEN_TEMPLATE
    elif kind == "llama3":
        specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                    "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"]
        tok = _byte_level(specials)
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
            special_tokens=[("<|begin_of_text|>", bos)])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                       eos_token="<|end_of_text|>",
                                       additional_special_tokens=specials[2:])
        fast.chat_template = LLAMA3_TEMPLATE
    elif kind == "sentencepiece":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                       unk_token="<unk>")
    else:
        raise ValueError(kind)
    fast.save_pretrained(str(folder))
    return folder


def tiny_model(tokenizer, eos_ids, arch: str = "qwen2"):
    """A random-init causal LM of the real architecture (tiny sizes) for this tokenizer, its
    generation config listing ``eos_ids``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import torch

    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, vocab_size=len(tokenizer), hidden_size=32,
                                  intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.eos_token_id = list(eos_ids)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model
