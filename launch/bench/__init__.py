"""`unroll bench ...`: the performance suite. Every figure is a ratio measured side by side in one run."""
