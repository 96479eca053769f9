"""One trial from config to result (`trial`): training, checkpoints, the test embeddings it saves
(`embeddings`), and what trials cost before they run: memory (`resources`) and a whole study's
time (`plan`)."""
