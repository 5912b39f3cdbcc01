"""The model side of a run: finding and loading the base (folders, hub ids, `package://`, GGUF), its tokenizer
and chat template, bitsandbytes quantization, the PEFT adapter, parameter counts and generation."""
