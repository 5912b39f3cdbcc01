"""Training tasks. Each supplies what differs between tasks (rows to examples, model class and head, trainer,
metrics, extra outputs); `finetune.runner` runs them all in one order. `registry` names them."""
