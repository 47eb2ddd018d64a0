"""gradwatch.agent: records gradient norms in the training process and ships them."""
