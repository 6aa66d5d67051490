"""Sample quality: Fréchet distance, KID, precision/recall, bootstrap intervals, Inception
features and their protocols, CLIP score, and the evaluation that puts them together."""
