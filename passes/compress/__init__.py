"""The compression partitioner (option `compress_activations`): what the forward saves for
backward and how it is compressed (`compress_saved`), and the graph surgery (`compress_rewrite`)."""
