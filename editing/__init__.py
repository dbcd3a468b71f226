"""The locate-and-edit machinery every method shares: keys at the fact token, second-moment
statistics, target values, the least-squares update over layers, the sequential state and one
editing round. Each method's own folder (``rome/``, ``ece/``, ``baselines/``) holds only what is its own."""
