//! ambit end-to-end test harness: the network-namespace testbed.
