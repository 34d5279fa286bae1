//! sluice-cni: the CNI plugin chained after flannel. Built in a later issue; for now it only says so.

fn main() {
    eprintln!("sluice-cni: not implemented yet (see the CNI chain issue)");
    std::process::exit(1);
}
