"""A randomly initialised SmolLM2-135M-shaped Llama (same config and tokenizer), saved to argv[1]."""
import sys
import torch
import transformers as tf
torch.manual_seed(0)
src, dst = ".gpu/shape", sys.argv[1]
cfg = tf.AutoConfig.from_pretrained(src)
model = tf.AutoModelForCausalLM.from_config(cfg).eval()
model.save_pretrained(dst)
tf.AutoTokenizer.from_pretrained(src).save_pretrained(dst)
print("random SmolLM2-shaped model saved to", dst, sum(p.numel() for p in model.parameters()), "parameters")
