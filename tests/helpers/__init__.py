"""Helpers the tests share: tiny real models and corpora (tiny_models), synthetic stores of any size
(synthetic_store, also used by bench/site.py), awkward batches for the accumulators (batches), and stores
compared view by view (stores)."""
