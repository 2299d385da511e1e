"""The byte-level model's token ids (seqio.ByteVocabulary: id = byte + 3), shared by the
model's defaults and the byte tokenizer (`checkpoint_io.tokenizer_files.BYTE`)."""
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
BYTE_VOCAB_SIZE = 256 + 3
