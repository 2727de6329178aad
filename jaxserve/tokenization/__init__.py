"""Tokenizers from the checkpoint's own path: `tokenizer_utils.load_tokenizer` (HF
directories, GGUF metadata) and Baichuan's SentencePiece tokenizer (`baichuan_tokenizer`),
whose original is remote code."""
