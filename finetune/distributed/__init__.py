"""Several processes and machines: guards against hangs and wrong world sizes (`guards`), DeepSpeed ZeRO configs
(`zero`), and the launcher commands of `finetune launch` (`launch`)."""
