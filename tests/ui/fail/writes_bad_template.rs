use cache_runtime::invalidates;

#[invalidates(key = "user:<idd>", key = "user <id>")]
async fn rename_user(id: u64, name: String) {
    let _ = (id, name);
}

#[invalidates(key = "tenant:<self.tenant>")]
async fn free_fn(id: u64) {
    let _ = id;
}

fn main() {}
