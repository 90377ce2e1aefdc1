-- Argo CD health of a pgwarden.io/v1alpha1 ApprovalRequest (Lua 5.1, as Argo CD runs it).
-- Pending waits for a person (Suspended); every decision is a normal end (Healthy).
local hs = {}
local spec = obj.spec or {}
local status = obj.status or {}
local state = status.state or "Pending" -- a new request has no status yet

local function decided(verb)
  local message = verb
  if status.decidedBy ~= nil then message = message .. " by " .. status.decidedBy end
  if status.comment ~= nil and status.comment ~= "" then
    message = message .. ": " .. status.comment
  end
  return message
end

if state == "Pending" then
  local who = "someone"
  if spec.requester ~= nil and spec.requester.username ~= nil then
    who = spec.requester.username
  end
  hs.status = "Suspended"
  hs.message = "Waiting for a decision: " .. who .. " asks to run a statement on "
    .. (spec.connection or "?") .. " (expires " .. (spec.expiresAt or "?") .. ")"
elseif state == "Approved" then
  hs.status = "Healthy"
  hs.message = decided("Approved")
elseif state == "Executed" then
  hs.status = "Healthy" -- the proxy ran it; decidedBy is still who approved it
  hs.message = decided("Executed; approved")
elseif state == "Denied" then
  hs.status = "Healthy"
  hs.message = decided("Denied")
elseif state == "Expired" then
  hs.status = "Healthy"
  hs.message = decided("Expired")
else
  hs.status = "Unknown"
  hs.message = "Unknown state " .. tostring(state)
end
return hs
