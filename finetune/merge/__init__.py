"""`finetune merge`: fold an adapter into its full-precision base (`merging`), planned and checked before anything
is written (`plan`, `lora`), streamed shard by shard (`streaming`), verified against PEFT (`verify`, `peft`), and
optionally exported as bitsandbytes weights (`export`)."""
