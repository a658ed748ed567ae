//! Results are sent again only where a copy may be lost: while the scheduler is merely down,
//! each confirmed result waits in `rota.results` once, however long the outage lasts.

use std::collections::HashSet;
use std::time::Duration;

use rota_tests::wire::{Job, JobId, Role};
use rota_tests::{System, results_in, within};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_not_piled_up_while_the_scheduler_is_down() {
    let sys = System::new().await;
    // No scheduler yet: nobody receipts. The resend timer ticks every 300 ms.
    let _agent = sys.agent("r1", &["--resend-interval", "300ms"]);
    sys.ready(false, &["r1"]).await;
    let mut beats = sys.heartbeats().await;
    let mut ids = HashSet::new();
    for _ in 0..5 {
        let mut job = Job::new("demo.echo", json!({ "n": 1 }));
        job.uuid = Some(JobId::random());
        ids.insert(sys.client.publish_job(job).await.expect("published"));
    }
    within(
        Duration::from_secs(30),
        "the 5 results stored, waiting for receipts",
        sys.heartbeat_where(&mut beats, Role::Agent, "r1", |hb| {
            hb.unreceipted == 5 && hb.running.is_empty()
        }),
    )
    .await;
    // Twenty heartbeats (200 ms each): over ten ticks of the resend timer.
    within(Duration::from_secs(30), "20 more heartbeats", async {
        for _ in 0..20 {
            sys.heartbeat_where(&mut beats, Role::Agent, "r1", |_| true)
                .await;
        }
    })
    .await;
    assert_eq!(
        results_in(&sys.names.results()).await,
        5,
        "one copy of each result waits for the scheduler"
    );

    // The scheduler comes back: everything is recorded and receipted.
    let _scheduler = sys.scheduler();
    within(
        Duration::from_secs(60),
        "every result recorded",
        sys.settled(&mut beats, "r1", &ids),
    )
    .await;
}
