"""The method's third use: screen training data, finetune with or without preventative steering,
and measure how far finetuning moved a model along a persona vector."""
