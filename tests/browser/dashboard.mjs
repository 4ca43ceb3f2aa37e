// Drives /dashboard in a headless chromium: the page loads and shows every partition with
// its lag, a dead letter's Replay button replays it and it leaves the list, and pausing a
// group from the page stops its consumption (resuming starts it again).
//
// Run by tests/observability/browser.rs with:
//   BASE_URL, ADMIN_TOKEN, USER_TOKEN, COUPON_ID, GROUP (the group to pause),
//   DEAD_LETTER_EVENT (the event id of an open dead letter), SCREENSHOT (a PNG path).
import { chromium } from "playwright-core";

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const BASE_URL = env("BASE_URL");
const ADMIN_TOKEN = env("ADMIN_TOKEN");
const GROUP = env("GROUP");
const DEAD_LETTER_EVENT = env("DEAD_LETTER_EVENT");
const TIMEOUT = 30_000;

function step(name) {
  console.log(`step: ${name}`);
}

async function api(method, path, token, body) {
  const answer = await fetch(BASE_URL + path, {
    method,
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await answer.json().catch(() => null);
  return { status: answer.status, json };
}

async function poll(what, check) {
  const deadline = Date.now() + TIMEOUT;
  for (;;) {
    const result = await check();
    if (result) return result;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  const problems = [];
  page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
  page.on("console", (message) => {
    if (message.type() === "error") problems.push(`console error: ${message.text()}`);
  });

  step("the page loads and goes live");
  await page.goto(`${BASE_URL}/dashboard#token=${ADMIN_TOKEN}`);
  await page.waitForSelector("#status.live", { timeout: TIMEOUT });
  if (page.url().includes("token=")) throw new Error("the token stayed in the address");

  step("every partition of every group shows its lag");
  const tree = (await api("GET", "/admin/actors", ADMIN_TOKEN)).json;
  for (const group of tree.consumerGroups) {
    for (const topic of group.topics) {
      for (const partition of [0, 1, 2]) {
        const cell = `[data-group="${group.groupId}"] tr[data-partition="${topic}/${partition}"] td.lag`;
        await page.waitForFunction(
          (selector) => {
            const element = document.querySelector(selector);
            return element && /^\d+$/.test(element.dataset.lag);
          },
          cell,
          { timeout: TIMEOUT },
        );
      }
    }
  }

  step("a dead letter is replayed by its button and leaves the list");
  const row = `#dead-letters tr[data-event-id="${DEAD_LETTER_EVENT}"]`;
  await page.waitForSelector(row, { timeout: TIMEOUT });
  await page.click(`${row} button.replay`);
  await page.waitForSelector(row, { state: "detached", timeout: TIMEOUT });

  step("pausing the group from the page stops its consumption");
  const box = `[data-group="${GROUP}"]`;
  await page.click(`${box} button[data-action="pause"]`);
  await page.waitForSelector(`${box} .badge[data-state="paused"]`, { timeout: TIMEOUT });
  const issued = await api("POST", "/coupons/issue", env("USER_TOKEN"), {
    couponId: Number(env("COUPON_ID")),
  });
  if (issued.status !== 202) throw new Error(`issue answered ${issued.status}: ${JSON.stringify(issued.json)}`);
  const requestId = issued.json.requestId;
  await page.waitForFunction(
    (selector) => [...document.querySelectorAll(`${selector} td.lag`)]
      .reduce((sum, cell) => sum + Number(cell.dataset.lag || 0), 0) === 1,
    box,
    { timeout: TIMEOUT },
  );
  const waiting = await api("GET", `/coupons/requests/${requestId}`, ADMIN_TOKEN);
  if (waiting.json.status !== "PENDING") {
    throw new Error(`the paused group decided the request: ${JSON.stringify(waiting.json)}`);
  }
  await page.screenshot({ path: process.env.SCREENSHOT || "dashboard.png", fullPage: true });

  step("resuming it from the page lets the request be decided");
  await page.click(`${box} button[data-action="resume"]`);
  await page.waitForSelector(`${box} .badge[data-state="running"]`, { timeout: TIMEOUT });
  await poll("the request decided", async () => {
    const answer = await api("GET", `/coupons/requests/${requestId}`, ADMIN_TOKEN);
    return answer.json && answer.json.status !== "PENDING";
  });
  await page.waitForFunction(
    (selector) => [...document.querySelectorAll(`${selector} td.lag`)]
      .every((cell) => cell.dataset.lag === "0"),
    box,
    { timeout: TIMEOUT },
  );

  if (problems.length) throw new Error(problems.join("\n"));
  console.log("dashboard: all steps passed");
} finally {
  await browser.close();
}
