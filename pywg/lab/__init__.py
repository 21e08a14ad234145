"""Lab tools shared by the tests, the demo and the benchmarks: the namespace bed, ICMP."""
