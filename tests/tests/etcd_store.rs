//! The coordinator's store on a real three-member etcd: one commit is one transaction, a
//! deposed leader's commits are refused, and commits stop (saying why) without a quorum,
//! the coordinator stepping down since it cannot tell whether they went in.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use blockrep_coordinator::election::{Candidate, Leadership};
use blockrep_coordinator::records::JobRecord;
use blockrep_coordinator::{Change, EtcdSettings, EtcdStore, Store, StoreError};
use blockrep_core::replication::{JobId, JobStatus, JobType};
use blockrep_tests::etcd::EtcdCluster;

fn job(progress: f64) -> JobRecord {
    JobRecord {
        id: JobId::random(),
        job_type: JobType::CreatePair,
        status: JobStatus::Running,
        begin_time: "2026-12-07T00:00:00Z".into(),
        end_time: None,
        progress,
        fail_reason: None,
        pair: None,
        group: None,
        result: None,
        project: "default".into(),
    }
}

fn settings(etcd: &EtcdCluster, prefix: &str) -> EtcdSettings {
    EtcdSettings {
        prefix: prefix.into(),
        request_timeout: Duration::from_secs(2),
        ..EtcdSettings::new(etcd.endpoints())
    }
}

/// A candidate at 127.0.0.1:1 with a lease of `ttl`, and its leadership once it leads.
async fn lead(settings: &EtcdSettings, ttl: Duration) -> (Candidate, Leadership) {
    let candidate = Candidate::connect(settings, "127.0.0.1:1".into(), ttl)
        .await
        .unwrap();
    let leading = candidate.campaign().await.unwrap();
    (candidate, leading)
}

/// A store fenced by `leadership`, and how many times it told its leader to step down.
fn leader_store(settings: &EtcdSettings, leadership: &Leadership) -> (EtcdStore, Arc<AtomicUsize>) {
    let steps_down = Arc::new(AtomicUsize::new(0));
    let told = Arc::clone(&steps_down);
    let store = tokio::task::block_in_place(|| EtcdStore::connect(settings.clone()))
        .unwrap()
        .fenced(leadership.fence.clone())
        .unwrap()
        .on_step_down(Box::new(move |_| {
            told.fetch_add(1, Ordering::SeqCst);
        }));
    (store, steps_down)
}

fn sorted_jobs(store: &dyn Store) -> Vec<JobRecord> {
    let mut jobs = store.load().unwrap().jobs;
    jobs.sort_by(|a, b| a.progress.total_cmp(&b.progress));
    jobs
}

#[test]
fn records_commit_whole_and_load_page_by_page() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(dir.path(), 3);
    let store = EtcdStore::connect(settings(&etcd, "/records")).unwrap();
    assert!(store.load().unwrap().is_empty());

    // 1200 records, more than two pages of a load, in commits of 100.
    let jobs: Vec<JobRecord> = (0..1200).map(|i| job(f64::from(i))).collect();
    for chunk in jobs.chunks(100) {
        store
            .commit(
                &chunk
                    .iter()
                    .cloned()
                    .map(Change::PutJob)
                    .collect::<Vec<_>>(),
            )
            .unwrap();
    }
    assert_eq!(sorted_jobs(&store), jobs);

    // A commit over etcd's transaction limit is refused whole.
    let over: Vec<Change> = (0..129)
        .map(|i| Change::PutJob(job(5000.0 + f64::from(i))))
        .collect();
    let refused = store.commit(&over);
    assert!(
        matches!(
            refused,
            Err(StoreError::TooLarge {
                changes: 129,
                limit: 128
            })
        ),
        "{refused:?}"
    );
    assert_eq!(store.load().unwrap().jobs.len(), 1200);

    // A put and a delete in one commit; a key changed twice keeps its last change.
    let mut moved = jobs[0].clone();
    moved.progress = 0.5;
    store
        .commit(&[
            Change::DeleteJob(jobs[1].id.to_string()),
            Change::PutJob(jobs[0].clone()),
            Change::PutJob(moved.clone()),
        ])
        .unwrap();
    let now = sorted_jobs(&store);
    assert_eq!(now.len(), 1199);
    assert_eq!(now[0], moved);

    // Another prefix is another store.
    let other = EtcdStore::connect(settings(&etcd, "/other")).unwrap();
    assert!(other.load().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leaders_commits_are_refused_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(dir.path(), 3);
    let settings = settings(&etcd, "/fenced");
    let ttl = Duration::from_secs(2);
    let first = Candidate::connect(&settings, "127.0.0.1:1".into(), ttl)
        .await
        .unwrap();
    let second = Candidate::connect(&settings, "127.0.0.1:2".into(), ttl)
        .await
        .unwrap();

    let old = first.campaign().await.unwrap();
    let (old_store, deposed) = leader_store(&settings, &old);
    let a = job(1.0);
    tokio::task::block_in_place(|| old_store.commit(&[Change::PutJob(a.clone())])).unwrap();
    assert_eq!(
        second.leader().await.unwrap().map(|l| (l.address, l.term)),
        Some(("127.0.0.1:1".into(), old.term()))
    );

    // The old leader's lease goes (as a pause past its TTL would end it); the second
    // candidate leads with a larger term.
    let old_term = old.term();
    old.resign().await;
    let new = second.campaign().await.unwrap();
    assert!(new.term() > old_term, "{} after {old_term}", new.term());
    let new_store = tokio::task::block_in_place(|| EtcdStore::connect(settings.clone()))
        .unwrap()
        .fenced(new.fence.clone())
        .unwrap();

    // The old leader, unaware, commits: refused, nothing written, and it is told.
    let b = job(2.0);
    let refused = tokio::task::block_in_place(|| {
        old_store.commit(&[
            Change::DeleteJob(a.id.to_string()),
            Change::PutJob(b.clone()),
        ])
    });
    assert!(
        matches!(refused, Err(StoreError::Deposed { term }) if term == old_term),
        "{refused:?}"
    );
    assert_eq!(deposed.load(Ordering::SeqCst), 1);
    assert_eq!(old_store.refused_commits(), 1);
    assert_eq!(
        tokio::task::block_in_place(|| sorted_jobs(&new_store)),
        vec![a.clone()]
    );

    // The new leader's commits go through.
    tokio::task::block_in_place(|| new_store.commit(&[Change::PutJob(b.clone())])).unwrap();
    assert_eq!(
        tokio::task::block_in_place(|| sorted_jobs(&new_store)),
        vec![a, b]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_commits_fail_saying_so_and_resume_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut etcd = EtcdCluster::start(dir.path(), 3);
    let settings = settings(&etcd, "/quorum");
    // A long lease: it outlives the outage, so what is seen is the commits' refusal.
    let (candidate, leading) = lead(&settings, Duration::from_secs(30)).await;
    let (store, steps_down) = leader_store(&settings, &leading);

    // One member of three down, the one that leads: a quorum remains, and commits once it
    // has elected a leader.
    let first = etcd.wait_for_leader(Duration::from_secs(30));
    etcd.kill(first);
    etcd.wait_for_leader(Duration::from_secs(30));
    tokio::task::block_in_place(|| store.commit(&[Change::PutJob(job(1.0))])).unwrap();

    // Two down: no quorum. The commit fails within its timeout, saying why. Whether it went
    // in is unknown (a member may have proposed it, to commit once a quorum is back), so the
    // leader steps down: the next leader loads what the store holds.
    let second = (first + 1) % 3;
    etcd.kill(second);
    let started = std::time::Instant::now();
    let refused = tokio::task::block_in_place(|| store.commit(&[Change::PutJob(job(2.0))]));
    assert!(
        matches!(refused, Err(StoreError::NoQuorum(_))),
        "{refused:?}"
    );
    assert!(
        refused.unwrap_err().to_string().contains("no quorum"),
        "the error says why"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(steps_down.load(Ordering::SeqCst), 1);

    // A member back: a quorum again. The leader that stepped down commits nothing more; a
    // new leadership commits.
    etcd.start_member(second);
    etcd.wait_healthy(Duration::from_secs(30));
    let stale = tokio::task::block_in_place(|| store.commit(&[Change::PutJob(job(9.0))]));
    assert!(
        matches!(stale, Err(StoreError::SteppedDown(_))),
        "{stale:?}"
    );
    leading.resign().await;
    // The client may try the member still down first; a campaign that fails is made again,
    // as the daemon does.
    let again = loop {
        match candidate.campaign().await {
            Ok(again) => break again,
            Err(e) => {
                assert!(started.elapsed() < Duration::from_secs(60), "{e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let store = tokio::task::block_in_place(|| EtcdStore::connect(settings.clone()))
        .unwrap()
        .fenced(again.fence.clone())
        .unwrap();
    tokio::task::block_in_place(|| store.commit(&[Change::PutJob(job(3.0))])).unwrap();
    let progress: Vec<f64> = tokio::task::block_in_place(|| sorted_jobs(&store))
        .iter()
        .map(|j| j.progress)
        .collect();
    assert!(
        progress == [1.0, 3.0] || progress == [1.0, 2.0, 3.0],
        "{progress:?}"
    );
}

/// `blockrep coordinator export` from a redb store and `import` into etcd move every record
/// unchanged; an import into a store that holds records, or one a coordinator leads on, is
/// refused and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_move_from_redb_to_etcd_with_the_cli() {
    use blockrep_coordinator::RedbStore;
    use blockrep_tests::{binary, run};
    use std::process::Command;

    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(&dir.path().join("etcd"), 3);
    let redb = dir.path().join("coordinator.redb");
    let jobs: Vec<JobRecord> = (0..300).map(|i| job(f64::from(i))).collect();
    {
        let store = RedbStore::open(&redb).unwrap();
        store
            .commit(&jobs.iter().cloned().map(Change::PutJob).collect::<Vec<_>>())
            .unwrap();
    }
    let export = dir.path().join("records.jsonl");
    let endpoints = etcd.endpoints().join(",");
    let said = run(Command::new(binary("blockrep")).args([
        "coordinator",
        "export",
        "--redb",
        redb.to_str().unwrap(),
        "--out",
        export.to_str().unwrap(),
    ]));
    assert_eq!(said, "exported 300 records");
    // A mistyped file is not a store with no records.
    let missing = Command::new(binary("blockrep"))
        .args(["coordinator", "export", "--redb"])
        .arg(dir.path().join("typo.redb"))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no coordinator store at"));
    assert!(!dir.path().join("typo.redb").exists());
    let import = || {
        Command::new(binary("blockrep"))
            .args([
                "coordinator",
                "import",
                "--etcd-endpoints",
                &endpoints,
                "--etcd-prefix",
                "/moved",
                "--in",
                export.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };

    // A coordinator leads on the prefix: refused.
    let settings = settings(&etcd, "/moved");
    let (_candidate, leading) = lead(&settings, Duration::from_secs(2)).await;
    let refused = tokio::task::block_in_place(import);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("a coordinator leads on this etcd prefix"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    leading.resign().await;
    let store = tokio::task::block_in_place(|| EtcdStore::connect(settings.clone())).unwrap();
    assert!(
        tokio::task::block_in_place(|| store.load())
            .unwrap()
            .is_empty()
    );

    // No coordinator: every record moves, unchanged (in three transactions of at most 128).
    let imported = tokio::task::block_in_place(import);
    assert!(imported.status.success(), "{imported:?}");
    assert_eq!(
        String::from_utf8_lossy(&imported.stdout).trim(),
        "imported 300 records"
    );
    assert_eq!(tokio::task::block_in_place(|| sorted_jobs(&store)), jobs);

    // Again: the store holds records now, so the import is refused.
    let again = tokio::task::block_in_place(import);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("holds 300 records already"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
}

/// A leader's commit goes in at most once, whatever its attempts do: when an earlier attempt
/// went in (its answer lost), the commit is taken as made; when the commit key moved under
/// the leader otherwise, the outcome is unknown and the leader steps down, after which its
/// commits are refused without being sent. A request etcd refuses outright (too large)
/// writes nothing and does not make the leader step down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaders_commit_goes_in_once_and_an_unknown_outcome_stops_its_commits() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(dir.path(), 3);
    let settings = settings(&etcd, "/once");
    let (_candidate, leading) = lead(&settings, Duration::from_secs(2)).await;
    let term = leading.term();
    let (store, steps_down) = leader_store(&settings, &leading);
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    let commit_key = "/once/commit";

    let a = job(1.0);
    tokio::task::block_in_place(|| store.commit(&[Change::PutJob(a.clone())])).unwrap();
    let named = raw.get(commit_key, None).await.unwrap();
    assert_eq!(named.kvs()[0].value_str().unwrap(), format!("{term}.1"));

    // Too large for etcd (its request limit is 1.5 MiB): refused, nothing written, and the
    // leader goes on.
    let mut huge = job(2.0);
    huge.fail_reason = Some("x".repeat(2 << 20));
    let refused = tokio::task::block_in_place(|| store.commit(&[Change::PutJob(huge)]));
    assert!(
        matches!(refused, Err(StoreError::Backend(_))),
        "{refused:?}"
    );
    assert_eq!(steps_down.load(Ordering::SeqCst), 0);

    // The next commit's first attempt "went in" (as one whose answer was lost would): the
    // commit key names it. The refused commit used name 2, so this one is 3. It is taken as
    // made.
    raw.put(commit_key, format!("{term}.3"), None)
        .await
        .unwrap();
    let b = job(3.0);
    tokio::task::block_in_place(|| store.commit(&[Change::PutJob(b.clone())])).unwrap();
    assert_eq!(steps_down.load(Ordering::SeqCst), 0);

    // The commit key moved under the leader, naming another commit: unknown; it steps down.
    raw.put(commit_key, "someone else", None).await.unwrap();
    let c = job(4.0);
    let unknown = tokio::task::block_in_place(|| store.commit(&[Change::PutJob(c.clone())]));
    assert!(
        matches!(&unknown, Err(StoreError::Backend(e)) if e.contains("the commit key moved")),
        "{unknown:?}"
    );
    assert_eq!(steps_down.load(Ordering::SeqCst), 1);

    // From then on nothing is sent: etcd's revision does not move.
    let before = raw
        .get(commit_key, None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let later = tokio::task::block_in_place(|| store.commit(&[Change::PutJob(job(5.0))]));
    assert!(
        matches!(later, Err(StoreError::SteppedDown(_))),
        "{later:?}"
    );
    assert!(matches!(
        tokio::task::block_in_place(|| store.check_leading()),
        Err(StoreError::SteppedDown(_))
    ));
    let after = raw
        .get(commit_key, None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert_eq!(before, after);
    assert_eq!(steps_down.load(Ordering::SeqCst), 1, "told once");
    let progress: Vec<f64> = tokio::task::block_in_place(|| sorted_jobs(&store))
        .iter()
        .map(|j| j.progress)
        .collect();
    assert_eq!(
        progress,
        vec![1.0],
        "b was not written by this commit, c and e not at all"
    );
}

/// A leader checks it still leads before it tells an agent anything from memory: true while
/// its key stands, and a deposed one is told so (and steps down).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_checks_it_still_leads() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = EtcdCluster::start(dir.path(), 3);
    let settings = settings(&etcd, "/check");
    let (candidate, leading) = lead(&settings, Duration::from_secs(2)).await;
    let (store, _) = leader_store(&settings, &leading);
    tokio::task::block_in_place(|| store.check_leading()).unwrap();
    leading.resign().await;
    // No candidate leads now: said so, not taken for an error.
    assert_eq!(candidate.leader().await.unwrap(), None);
    let deposed = tokio::task::block_in_place(|| store.check_leading());
    assert!(
        matches!(deposed, Err(StoreError::Deposed { .. })),
        "{deposed:?}"
    );
}

/// Mutual TLS to etcd: with the CA of the members' certificate and a client certificate
/// their CA signed, records commit and load; without a client certificate, or trusting
/// another CA, the store cannot connect, and says so. The certificates are the cluster's
/// own (`blockrep cluster init-ca`, `issue-cert`).
#[test]
fn the_store_reaches_etcd_over_mutual_tls() {
    use blockrep_coordinator::EtcdTls;
    use blockrep_tests::etcd::ServerTls;

    let dir = tempfile::tempdir().unwrap();
    let path = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let ca = dir.path().join("ca");
    blockrep_tests::cluster::cli(&["cluster", "init-ca", "--dir", &path(&ca)]);
    let issue = |node: &str| {
        let out = dir.path().join(node);
        blockrep_tests::cluster::cli(&[
            "cluster",
            "issue-cert",
            "--ca-dir",
            &path(&ca),
            "--node",
            node,
            "--out-dir",
            &path(&out),
        ]);
        out
    };
    let server = issue("localhost");
    let client = issue("co-1");
    let etcd = EtcdCluster::start_tls(
        &dir.path().join("etcd"),
        1,
        ServerTls {
            cert: server.join("node.pem"),
            key: server.join("node.key"),
            ca: server.join("ca.pem"),
        },
    );
    let with = |tls: Option<EtcdTls>| EtcdSettings {
        prefix: "/tls".into(),
        tls,
        request_timeout: Duration::from_secs(2),
        ..EtcdSettings::new(etcd.endpoints())
    };
    let mutual = EtcdTls {
        ca: client.join("ca.pem"),
        cert: client.join("node.pem"),
        key: client.join("node.key"),
    };
    let store = EtcdStore::connect(with(Some(mutual.clone()))).unwrap();
    let a = job(1.0);
    store.commit(&[Change::PutJob(a.clone())]).unwrap();
    assert_eq!(sorted_jobs(&store), vec![a]);

    // No TLS at all to an https endpoint: refused.
    let plain = EtcdStore::connect(with(None)).and_then(|s| s.load().map(drop));
    assert!(plain.is_err(), "{plain:?}");
    // Trusting another CA: the member's certificate is refused.
    let other = dir.path().join("other-ca");
    blockrep_tests::cluster::cli(&["cluster", "init-ca", "--dir", &path(&other)]);
    let wrong_ca = EtcdTls {
        ca: other.join("ca.pem"),
        ..mutual.clone()
    };
    let refused = EtcdStore::connect(with(Some(wrong_ca))).and_then(|s| s.load().map(drop));
    assert!(refused.is_err(), "{refused:?}");
    // A certificate file that is not there: said at once.
    let missing = EtcdTls {
        cert: dir.path().join("nowhere.pem"),
        ..mutual
    };
    let said = EtcdStore::connect(with(Some(missing)))
        .err()
        .unwrap()
        .to_string();
    assert!(said.contains("read the etcd client certificate"), "{said}");
}
