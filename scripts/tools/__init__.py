"""Tools: export of adapters, the tokenizer-file builder, the toy model trainer."""
