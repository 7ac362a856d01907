#!/usr/bin/perl

# The status page: after known traffic, GET /ratepool/status says what
# happened, for all workers at once, and what is happening right now.

use strict;
use warnings;

use lib 't/lib';

use Digest::SHA qw(sha256_hex);
use JSON::PP;
use POSIX ();
use Test::More;
use Time::HiRes qw(sleep);

use Ratepool::Test;

my $t = Ratepool::Test->new;

*random_hex = \&Ratepool::Test::random_hex;

my %SECRET = map { $_ => 'sk-ant-mock-' . random_hex(16) } qw(a1 b1);
my $TOKEN = 'gw-status-' . random_hex(16);

# what the provider says differs from what is configured: learned wins
my $mock = $t->start_mock(port => 1, config => {
    keys => { $SECRET{a1} => { org => 'org-a', name => 'a1' },
              $SECRET{b1} => { org => 'org-b', name => 'b1' } },
    orgs => { 'org-a' => { rpm => 600, itpm => 40000, otpm => 9000 },
              'org-b' => { rpm => 600, itpm => 50000, otpm => 7000 } },
});

$t->write_file('a1.key', "$SECRET{a1}\n");

my $token_sha = sha256_hex($TOKEN);

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    upstream claude {
        ratepool zone=llm;
        ratepool_org org-a rpm=1000 itpm=30000 otpm=8000;
        ratepool_org org-b rpm=1000;
        ratepool_key a1 org=org-a server=127.0.0.1:%%PORT_1%%
                     key_file=%%TESTDIR%%/a1.key;
        ratepool_key b1 org=org-b server=127.0.0.1:%%PORT_1%%
                     key=$SECRET{b1};
        keepalive 8;
    }

    ratepool_workspace backend rpm=100;
    ratepool_client backend sha256:$token_sha;

    log_format pids '\$pid \$status \$request_uri';

    server {
        listen 127.0.0.1:%%PORT_0%%;
        access_log %%TESTDIR%%/pids.log pids;

        location /v1/ {
            ratepool_pass http://claude;
        }

        location = /ratepool/status {
            ratepool_status;
        }
    }
}
EOF

$t->run;

sub message {
    my ($token, @headers) = @_;
    return $t->messages(token => $token, headers => \@headers);
}

sub status { $t->status }

*by_name = \&Ratepool::Test::by_name;

# known traffic: 12 at once (both workers take some), then 8 in a row

my $burst = $t->parallel(12, sub { message($TOKEN)->{status} });
is_deeply($burst, [ (200) x 12 ], 'twelve concurrent requests are answered');

for (1 .. 8) {
    my $r = message($TOKEN);
    is($r->{status}, 200, "request $_ in a row is answered");
}

my $r = message('gw-status-unknown-' . random_hex(8));
is($r->{status}, 401, 'an unknown gateway token is refused');

open my $pids_log, '<', $t->testdir . '/pids.log' or die "pids.log: $!\n";
my %pids = map { /^(\d+) 200 \/v1\// ? ($1 => 1) : () } <$pids_log>;
cmp_ok(scalar keys %pids, '>=', 2, 'both workers served requests')
    or diag 'served by ' . join ', ', keys %pids;

$r = $t->http(port => $t->port(0), path => '/ratepool/status');
is($r->{status}, 200, 'the status page answers');
like($r->{headers}{'content-type'}, qr{^application/json},
    'with JSON');

my $s = eval { decode_json($r->{body}) } || {};
my $pool = $s->{pools}[0] || {};
my $keys = by_name($pool->{keys});
my $orgs = by_name($pool->{orgs});
my $ws = by_name($s->{workspaces})->{backend} || {};

is($s->{zone}, 'llm', 'it names the zone');
is($pool->{name}, 'claude', 'and the pool');
is($s->{totals}{requests}, 21, 'every request of every worker is counted');
is($s->{totals}{rejected_auth}, 1, 'the unknown token counts as rejected');
is($s->{totals}{rejected_workspace}, 0, 'no workspace was over budget');
is($s->{totals}{rejected_pool}, 0, 'the pool never ran dry');
is($s->{totals}{rerouted}, 0, 'nothing was re-routed');
is($s->{totals}{in_flight}, 0, 'nothing is in flight at rest');

is($keys->{a1}{sent} + $keys->{b1}{sent}, 20,
    'the keys sent the twenty admitted requests between them');
ok($keys->{a1}{sent} && $keys->{b1}{sent}, 'both keys were used');
for my $name (qw(a1 b1)) {
    my $k = $keys->{$name} || {};
    is($k->{responses}{'2xx'}, $k->{sent}, "every request of $name got a 2xx");
    is($k->{responses}{$_}, 0, "$name had no $_ answer")
        for qw(429 529 other failed);
    is($k->{state}, 'ok', "$name is ok");
    is($k->{in_flight}, 0, "$name has nothing in flight");
    is($k->{fingerprint}, substr(sha256_hex($SECRET{$name}), 0, 12),
        "$name is shown by the first 12 hex digits of its sha256");
    is($k->{provider}, 'anthropic', "$name is an anthropic key");
}
is($keys->{a1}{org}, 'org-a', 'a key names its org');

for my $name (qw(org-a org-b)) {
    my $o = $orgs->{$name} || {};
    is($o->{rpm_configured}, 1000, "$name shows its configured rpm");
    is($o->{learned}{requests}{limit}, 600,
        "$name learned the provider's request limit");
    my $served = $keys->{ $name eq 'org-a' ? 'a1' : 'b1' }{sent};
    ok($o->{learned}{requests}{remaining} < 600
       && $o->{learned}{requests}{remaining} >= 600 - $served,
       "$name learned the remaining requests from the provider's answers");
    is($o->{rpm_limit}, 600, "$name is limited by what the provider said");
    is($o->{in_flight}, 0, "$name has nothing in flight");
}
is($orgs->{'org-a'}{itpm_configured}, 30000, 'the configured itpm is shown');
is($orgs->{'org-a'}{learned}{input_tokens}{limit}, 40000,
    'the provider\'s input token limit is learned');
is($orgs->{'org-b'}{learned}{output_tokens}{limit}, 7000,
    'the provider\'s output token limit is learned');
is($keys->{b1}{learned_requests_remaining},
    $orgs->{'org-b'}{learned}{requests}{remaining},
    'a key shows what its org learned');

is($ws->{rpm_limit}, 100, 'the workspace shows its rpm budget');
is($ws->{admitted}, 20, 'the workspace admitted the twenty requests');
is($ws->{rejected}, 0, 'and rejected none');
cmp_ok($ws->{rpm_available}, '<=', 100 - 20 + 5,
    'its budget was drawn from');

# slow requests are in flight while they run

my @slow;
for (1 .. 3) {
    my $pid = fork // die "fork: $!\n";
    if (!$pid) {
        my $status = message($TOKEN, 'x-mock-delay-ms' => 1500)->{status};
        POSIX::_exit($status == 200 ? 0 : 1);
    }
    push @slow, $pid;
}

sleep 0.7;
$s = status();
$keys = by_name($s->{pools}[0]{keys});
$orgs = by_name($s->{pools}[0]{orgs});

is($s->{totals}{in_flight}, 3, 'three slow requests are in flight');
is($keys->{a1}{in_flight} + $keys->{b1}{in_flight}, 3,
    'the keys hold them between them');
is($orgs->{'org-a'}{in_flight} + $orgs->{'org-b'}{in_flight}, 3,
    'and so do their orgs');

my @failed = grep { waitpid($_, 0) && $? } @slow;
ok(!@failed, 'the slow requests are answered');

$s = status();
is($s->{totals}{in_flight}, 0, 'nothing is in flight once they are done');
is($s->{totals}{requests}, 24, 'and they are counted');

# the page is read-only

$r = $t->http(port => $t->port(0), method => 'POST', path => '/ratepool/status',
              body => '{}');
is($r->{status}, 405, 'POST to the status page is not allowed');
is(status()->{totals}{requests}, 24, 'and changes nothing');

# the same state for Prometheus

$r = $t->http(port => $t->port(0), path => '/ratepool/status?format=prometheus');
my $text = $r->{body};
my %sample = map { /^(\S+) (\d+)$/ ? ($1 => $2) : () } split /\n/, $text;
my ($json_keys) = map { Ratepool::Test::by_name($_->{keys}) }
                  @{ status()->{pools} };

is($r->{status}, 200, 'the status answers in Prometheus\' text format');
like($r->{headers}{'content-type'}, qr{^text/plain; version=0\.0\.4},
    'with its content type');
is($sample{ratepool_requests_total}, 24, 'the request count is there');
is($sample{'ratepool_key_sent_total{pool="claude",key="a1",org="org-a"}'},
    $json_keys->{a1}{sent}, 'and each key\'s count, as in the JSON');
is($sample{'ratepool_key_responses_total{pool="claude",key="b1",'
           . 'status="2xx"}'},
    $json_keys->{b1}{responses}{'2xx'}, 'and its answers by status');
is($sample{'ratepool_org_limit{pool="claude",org="org-a",model="",'
           . 'bucket="rpm"}'},
    600, 'and each org\'s learned limit');
ok(exists $sample{'ratepool_workspace_requests_total{workspace="backend",'
                  . 'result="admitted"}'}, 'and each workspace\'s requests');

my %type;
my $grouped = 1;
for (split /\n/, $text) {
    if (/^# TYPE (\S+) /) {
        $grouped = 0 if $type{$1}++;
    } elsif (/^([a-z_]+)[{ ]/) {
        my $family = $1;
        # a histogram's samples are its name with a suffix
        $family =~ s/_(?:bucket|sum|count)$// unless $type{$family};
        $grouped = 0 unless $type{$family};
    }
}
ok($grouped, 'every family is declared once, before its samples');
unlike($text, qr/\Q$SECRET{a1}\E|\Q$SECRET{b1}\E|\Q$TOKEN\E/,
    'and no secret is in it');

$t->stop;
$t->check_log;

done_testing;
