"""Tiny random-weight transformers VLMs built from configs (no downloads), for demos and tests.

Needs `transformers` (the `hf` extra).  Each builder returns `(model, inputs)`: an eval-mode
model with SDPA attention and the keyword inputs of one image-text prompt.
"""
import torch


def qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    text = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                 "rope_theta": 10000.0},
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, in_channels=3,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=250,
                        video_token_id=251, vision_start_token_id=252, vision_end_token_id=253)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    grid = torch.tensor([[1, 4, 4]])  # 16 patches -> 4 merged image tokens
    pixels = torch.randn(16, 3 * 2 * 14 * 14)
    ids = torch.tensor([[1, 10, 11, 252] + [250] * 4 + [253] + list(range(20, 30))])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                  image_grid_thw=grid, mm_token_type_ids=(ids == 250).int())
    return model, inputs


def llava():
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, image_size=32, patch_size=8,
                              projection_dim=32)
    text = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=250,
                      vision_feature_layer=-1, vision_feature_select_strategy="default")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg).eval()
    ids = torch.tensor([[1, 10, 11] + [250] * 16 + list(range(20, 30))])  # 16 image tokens
    return model, dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                       pixel_values=torch.randn(1, 3, 32, 32))


def llava_checkpoint(folder) -> None:
    """Write a tiny LLaVA checkpoint with a processor to ``folder`` (``from_pretrained``-able):
    ``llava()``'s random weights, a character-level tokenizer, a CLIP image processor (32 x 32
    images, 16 image tokens) and a chat template.  What the harness's checkpoint path loads in
    tests, without downloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlavaProcessor, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    words = ["<pad>", "<s>", "</s>"] + [chr(c) for c in range(32, 127)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens=["<image>"])
    template = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}"
                "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}"
                "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    images = CLIPImageProcessorPil(size={"shortest_edge": 32},
                                   crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, chat_template=template,
                   patch_size=8, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1).save_pretrained(folder)
    model, _ = llava()
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    model.config.image_token_id = model.config.image_token_index = image_token
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
