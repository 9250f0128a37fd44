//! Command-line options.

use hvmem::Level;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LogApi {
    /// `KVM_GET_DIRTY_LOG` without manual protection: get-and-clear.
    Classic,
    /// Manual protection with initially-all-set: get, then clear in 64-page masks.
    Manual,
}

pub(crate) struct Opts {
    pub(crate) vcpus: usize,
    pub(crate) bytes: u64,
    pub(crate) backing: Level,
    pub(crate) iterations: usize,
    pub(crate) fracs: Vec<u64>,
    pub(crate) apis: Vec<LogApi>,
    pub(crate) quick: bool,
}

fn parse_size(s: &str) -> u64 {
    let s = s.to_ascii_lowercase();
    let (num, mult) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (&s[..], 1),
    };
    let n: u64 = num
        .parse()
        .unwrap_or_else(|_| panic!("bad size {s:?} (e.g. 64m, 1g)"));
    n * mult
}

pub(crate) fn parse_opts() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Opts {
        vcpus: 2,
        bytes: 1 << 30,
        backing: Level::L3,
        iterations: 2,
        fracs: vec![1, 5],
        apis: vec![LogApi::Classic, LogApi::Manual],
        quick: false,
    };
    if args.iter().any(|a| a == "--quick") {
        o.quick = true;
        o.bytes = 64 << 20;
        o.backing = Level::L2;
        o.iterations = 3;
    }
    let mut i = 0;
    let val = |i: usize| -> &str {
        args.get(i + 1)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{} needs a value", args[i]))
    };
    while i < args.len() {
        match args[i].as_str() {
            "--quick" => {}
            "-v" => {
                o.vcpus = val(i).parse().expect("-v takes a number");
                i += 1;
            }
            "-b" => {
                o.bytes = parse_size(val(i));
                i += 1;
            }
            "-s" => {
                o.backing = match val(i) {
                    "2m" | "2M" => Level::L2,
                    "1g" | "1G" => Level::L3,
                    v => panic!("-s takes 2m or 1g, not {v}"),
                };
                i += 1;
            }
            "-i" => {
                o.iterations = val(i).parse().expect("-i takes a number");
                i += 1;
            }
            "-f" => {
                o.fracs = vec![val(i).parse().expect("-f takes a number")];
                i += 1;
            }
            "-g" => o.apis = vec![LogApi::Classic],
            "-m" => o.apis = vec![LogApi::Manual],
            "-h" | "--help" => {
                println!(
                    "dirty_log_perf [-v vcpus] [-b bytes/vcpu] [-s 2m|1g] [-i iterations] \
                     [-f write 1 in N] [-g | -m] [--quick]"
                );
                std::process::exit(0);
            }
            a => panic!("unknown option {a} (try --help)"),
        }
        i += 1;
    }
    assert!((1..=64).contains(&o.vcpus), "-v takes 1 to 64");
    assert!(o.iterations >= 1, "-i must be at least 1");
    assert!(o.fracs.iter().all(|&f| f >= 1), "-f must be at least 1");
    assert!(
        o.bytes >= 4096 && o.bytes % o.backing.page_size() == 0,
        "-b must be a multiple of the host page size"
    );
    o
}
