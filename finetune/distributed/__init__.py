"""Several processes and machines: guards against hangs and wrong world sizes (`guards`), DeepSpeed ZeRO configs
(`zero`). The launcher commands of `finetune launch` are in `finetune/launcher.py`, a layer above."""
