"""leanfed algorithms: sparse training, continual learning, aggregation, wire codec."""
