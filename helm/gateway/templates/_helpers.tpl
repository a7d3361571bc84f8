{{/*
Chart name, truncated to the 63 characters a label value allows.
*/}}
{{- define "gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: the release name, prefixed to the chart name unless it already contains it.
*/}}
{{- define "gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels (https://kubernetes.io/docs/concepts/overview/working-with-objects/common-labels/).
*/}}
{{- define "gateway.labels" -}}
{{ include "gateway.commonLabels" . }}
{{ include "gateway.selectorLabels" . }}
{{- end }}

{{/*
Labels of every object besides the selector labels.
*/}}
{{- define "gateway.commonLabels" -}}
helm.sh/chart: {{ include "gateway.chart" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/part-of: gateway
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selects the server pods only: the component keeps the helm test pod out of the Service.
*/}}
{{- define "gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gateway.image" -}}
{{- printf "%s:%s" .Values.image.repository (toString (default .Chart.AppVersion .Values.image.tag)) }}
{{- end }}

{{/*
API key Secret: the existing one, else the chart's own when apiKey.create; empty when no key is configured.
*/}}
{{- define "gateway.apiKeySecretName" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecret }}
{{- else if .Values.apiKey.create }}
{{- printf "%s-api-key" (include "gateway.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "gateway.apiKeySecretKey" -}}
{{- if .Values.apiKey.existingSecret }}
{{- .Values.apiKey.existingSecretKey }}
{{- else }}
{{- "api-key" }}
{{- end }}
{{- end }}

{{/*
The MODEL positional argument of `gateway serve`; empty for the model baked into the image.
*/}}
{{- define "gateway.modelArg" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "image" }}
{{- $m.path }}
{{- else if $m.path }}
{{- printf "%s/%s" (trimSuffix "/" $m.mountPath) (trimPrefix "/" $m.path) }}
{{- else }}
{{- $m.mountPath }}
{{- end }}
{{- end }}

{{/*
Container args: `gateway serve [MODEL] --host 0.0.0.0 --port N ...`, as a YAML list.
tests/test_helm.py feeds exactly this list to gateway.cli.build_parser().
*/}}
{{- define "gateway.args" -}}
{{- $e := .Values.engine }}
{{- $s := .Values.server }}
- serve
{{- with include "gateway.modelArg" . }}
- {{ . | quote }}
{{- end }}
- --host
- "0.0.0.0"
- --port
- {{ $s.port | int64 | quote }}
- --tp
- {{ $e.tensorParallelSize | int64 | quote }}
{{- if gt (int $e.pipelineParallelSize) 1 }}
- --pp
- {{ $e.pipelineParallelSize | int64 | quote }}
{{- end }}
{{- if .Values.multiHost.enabled }}
{{- include "gateway.rendezvousArgs" . }}
- --node-rank
- "0"
{{- end }}
{{- if .Values.gpu.enabled }}
- --device
- cuda
{{- end }}
{{- with .Values.model.servedModelName }}
- --served-model-name
- {{ . | quote }}
{{- end }}
{{- if not (kindIs "invalid" $e.maxModelLen) }}
- --max-model-len
- {{ $e.maxModelLen | int64 | quote }}
{{- end }}
{{- if not (kindIs "invalid" $e.maxNumSeqs) }}
- --max-num-seqs
- {{ $e.maxNumSeqs | int64 | quote }}
{{- end }}
{{- if not (kindIs "invalid" $e.maxNumBatchedTokens) }}
- --max-num-batched-tokens
- {{ $e.maxNumBatchedTokens | int64 | quote }}
{{- end }}
{{- with $e.kvCacheMemory }}
- --kv-cache-memory
- {{ . | quote }}
{{- end }}
{{- if and $e.dtype (ne $e.dtype "auto") }}
- --dtype
- {{ $e.dtype | quote }}
{{- end }}
{{- if not (kindIs "invalid" $e.numThreads) }}
- --num-threads
- {{ $e.numThreads | int64 | quote }}
{{- end }}
- --log-level
- {{ $s.logLevel | quote }}
- --shutdown-grace
- {{ include "gateway.shutdownGrace" . | quote }}
{{- with $s.metricsCompat }}
- --metrics-compat
- {{ . | quote }}
{{- end }}
{{- if $s.guardMetrics }}
- --guard-metrics
{{- end }}
{{- range $e.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/*
multiHost: where every node of a LeaderWorkerSet group meets (LWS sets LWS_LEADER_ADDRESS, the
leader pod's address through the group's headless service, and LWS_WORKER_INDEX in each pod;
Kubernetes expands $(VAR) in args).
*/}}
{{- define "gateway.rendezvousArgs" -}}
{{- $h := .Values.multiHost }}
- --nnodes
- {{ $h.nodes | int64 | quote }}
- --master-addr
- "$(LWS_LEADER_ADDRESS)"
- --master-port
- {{ $h.port | int64 | quote }}
- --dist-timeout
- {{ $h.timeoutSeconds | int64 | quote }}
{{- end }}

{{/*
A multiHost worker pod: `gateway worker`; its configuration comes from the leader.
*/}}
{{- define "gateway.workerArgs" -}}
- worker
{{- include "gateway.rendezvousArgs" . }}
- --node-rank
- "$(LWS_WORKER_INDEX)"
- --log-level
- {{ .Values.server.logLevel | quote }}
{{- end }}

{{/*
The container resources, with the GPUs of the ranks in one pod (tp x pp / nodes) on GPU nodes.
*/}}
{{- define "gateway.resources" -}}
{{- $resources := deepCopy (default (dict) .Values.resources) }}
{{- if .Values.gpu.enabled }}
{{- $e := .Values.engine }}
{{- $nodes := ternary (int .Values.multiHost.nodes) 1 .Values.multiHost.enabled }}
{{- $limits := default (dict) $resources.limits }}
{{- $_ := set $limits .Values.gpu.resourceName (div (mul (int $e.tensorParallelSize) (int $e.pipelineParallelSize)) $nodes | int64) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/*
Seconds of --shutdown-grace: what terminationGracePeriodSeconds leaves after the preStop sleep and the margin.
*/}}
{{- define "gateway.shutdownGrace" -}}
{{- $d := .Values.shutdown }}
{{- sub (int .Values.terminationGracePeriodSeconds) (add (int $d.preStopSleepSeconds) (int $d.marginSeconds)) }}
{{- end }}

{{/*
Whether an autoscaler owns the replica count.
*/}}
{{- define "gateway.autoscaled" -}}
{{- if or .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}true{{ end }}
{{- end }}

{{/*
The most replicas that can run (for the PodDisruptionBudget).
*/}}
{{- define "gateway.maxReplicas" -}}
{{- if .Values.autoscaling.keda.enabled }}
{{- .Values.autoscaling.keda.maxReplicaCount }}
{{- else if .Values.autoscaling.hpa.enabled }}
{{- .Values.autoscaling.hpa.maxReplicas }}
{{- else }}
{{- .Values.replicaCount }}
{{- end }}
{{- end }}

{{/*
Checks across values that the JSON schema cannot express; rendered (as nothing) by every manifest.
*/}}
{{- define "gateway.validate" -}}
{{- $m := .Values.model }}
{{- if and (eq $m.source "pvc") (not $m.pvc.claimName) }}
{{- fail "model.source=pvc needs model.pvc.claimName (an existing PersistentVolumeClaim)" }}
{{- end }}
{{- if and (eq $m.source "hostPath") (not $m.hostPath.path) }}
{{- fail "model.source=hostPath needs model.hostPath.path (a directory on the node)" }}
{{- end }}
{{- if and .Values.apiKey.create .Values.apiKey.existingSecret }}
{{- fail "set apiKey.existingSecret or apiKey.create, not both" }}
{{- end }}
{{- if and .Values.apiKey.create (not .Values.apiKey.value) }}
{{- fail "apiKey.create needs apiKey.value (or set apiKey.existingSecret instead)" }}
{{- end }}
{{- if and .Values.server.guardMetrics (not (include "gateway.apiKeySecretName" .)) }}
{{- fail "server.guardMetrics needs an API key (apiKey.existingSecret, or apiKey.create with apiKey.value)" }}
{{- end }}
{{- if and .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}
{{- fail "enable either autoscaling.hpa or autoscaling.keda, not both (KEDA creates its own HPA)" }}
{{- end }}
{{- $hpa := .Values.autoscaling.hpa }}
{{- if and $hpa.enabled (gt (int $hpa.minReplicas) (int $hpa.maxReplicas)) }}
{{- fail "autoscaling.hpa.minReplicas must not exceed maxReplicas" }}
{{- end }}
{{- if and $hpa.enabled (kindIs "invalid" $hpa.targetCPUUtilizationPercentage) (not $hpa.requestsWaiting.enabled) }}
{{- fail "autoscaling.hpa needs a metric: targetCPUUtilizationPercentage and/or requestsWaiting.enabled" }}
{{- end }}
{{- if and $hpa.enabled (not (kindIs "invalid" $hpa.targetCPUUtilizationPercentage)) (not (dig "requests" "cpu" "" .Values.resources)) }}
{{- fail "autoscaling.hpa.targetCPUUtilizationPercentage needs resources.requests.cpu" }}
{{- end }}
{{- if lt (int (include "gateway.shutdownGrace" .)) 0 }}
{{- fail "terminationGracePeriodSeconds must be at least shutdown.preStopSleepSeconds + shutdown.marginSeconds (the drain would get no time)" }}
{{- end }}
{{- $h := .Values.multiHost }}
{{- if and $h.enabled (include "gateway.autoscaled" .) }}
{{- fail "multiHost does not combine with autoscaling (a LeaderWorkerSet group is scaled by multiHost.groups)" }}
{{- end }}
{{- $ranks := mul (int .Values.engine.tensorParallelSize) (int .Values.engine.pipelineParallelSize) }}
{{- if and $h.enabled (mod $ranks (int $h.nodes)) }}
{{- fail "multiHost.nodes must divide engine.tensorParallelSize x engine.pipelineParallelSize (the ranks per pod)" }}
{{- end }}
{{- $keda := .Values.autoscaling.keda }}
{{- if and $keda.enabled (gt (int $keda.minReplicaCount) (int $keda.maxReplicaCount)) }}
{{- fail "autoscaling.keda.minReplicaCount must not exceed maxReplicaCount" }}
{{- end }}
{{- end }}
