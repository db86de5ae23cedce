//! The fio workloads, as data.

/// How a figure is read off a fio result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Figure {
    Iops,
    MegabytesPerSecond,
}

#[derive(Clone, Debug)]
pub struct Workload {
    pub name: &'static str,
    pub title: &'static str,
    pub figure: Figure,
    pub fio_args: &'static [&'static str],
}

pub fn all() -> Vec<Workload> {
    vec![
        Workload {
            name: "randwrite-4k-qd32",
            title: "4k randwrite QD32",
            figure: Figure::Iops,
            fio_args: &["--rw=randwrite", "--bs=4k", "--iodepth=32"],
        },
        Workload {
            // A hot spot: the same few blocks written over and over, which an async pair's
            // journal coalesces within an epoch.
            name: "randwrite-4k-zipf-qd32",
            title: "4k randwrite zipf:1.2 QD32",
            figure: Figure::Iops,
            fio_args: &[
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=32",
                "--random_distribution=zipf:1.2",
            ],
        },
        Workload {
            name: "randread-4k-qd32",
            title: "4k randread QD32",
            figure: Figure::Iops,
            fio_args: &["--rw=randread", "--bs=4k", "--iodepth=32"],
        },
        Workload {
            name: "randwrite-4k-qd1",
            title: "4k randwrite QD1",
            figure: Figure::Iops,
            fio_args: &["--rw=randwrite", "--bs=4k", "--iodepth=1"],
        },
        Workload {
            name: "seqwrite-1m-qd8",
            title: "1M seq write QD8",
            figure: Figure::MegabytesPerSecond,
            fio_args: &["--rw=write", "--bs=1M", "--iodepth=8"],
        },
        Workload {
            // Less than a block per request, as the reference NBD project's tester writes:
            // each request a read-modify-write of its block, unless merged.
            name: "seqwrite-1k-qd16",
            title: "1k seq write QD16",
            figure: Figure::MegabytesPerSecond,
            fio_args: &["--rw=write", "--bs=1k", "--iodepth=16"],
        },
        Workload {
            name: "randrw-70-30-4k-qd16",
            title: "4k 70/30 randrw QD16",
            figure: Figure::Iops,
            fio_args: &["--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=16"],
        },
    ]
}
