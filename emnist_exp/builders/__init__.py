"""tfds dataset builders of the project's own: official IDX folders and the synthetic set."""
